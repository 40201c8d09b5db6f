"""Module-level pieces of the Lightning DDP test (``ddp_spawn`` pickles them into each rank)."""
from __future__ import annotations

import lightning
import torch
import torch.distributed as dist

from masked_optim import MaskedAdamW


class RankBatches:
    """Old batches of this rank: different data on every rank, as a DistributedSampler gives."""

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = torch.Generator().manual_seed(10 + rank)
        return iter([(torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(3)])


class Module(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return MaskedAdamW(self.parameters(), lr=1e-2, anchor_decay=2.0)


class AnchorsAgree(lightning.Callback):
    """After the ConsolidateCallback: every rank holds the same anchors."""

    def on_train_start(self, trainer, module) -> None:
        opt = trainer.optimizers[0]
        for p in module.parameters():
            anchor = opt.state[p]["anchor"]
            gathered = [torch.empty_like(anchor) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, anchor)
            assert all(torch.equal(a, gathered[0]) for a in gathered), "the ranks' anchors differ"
