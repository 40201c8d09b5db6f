"""MaskedAdamW inside Hugging Face's Trainer and Lightning, on CPU with tiny random models.

Trainer: ``optimizer_cls_and_kwargs`` on a 2-layer GPT-2 with a consolidation mid-run; a run
resumed from a checkpoint ends bit-identical to the uninterrupted one (weights, optimizer
state). Lightning: ``configure_optimizers`` returning MaskedAdamW under ``bf16-mixed`` with gradient
clipping, stepped through Lightning's closure.
"""
from __future__ import annotations

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, snapshot
from tests.tolerances import assert_close

OPTIONS = dict(lr=3e-3, density=0.5, anchor_decay=10.0, importance_beta=0.9)


def unwrap(optimizer):
    """The MaskedAdamW inside accelerate's AcceleratedOptimizer (what Trainer and callbacks hold)."""
    return getattr(optimizer, "optimizer", optimizer)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 64, length: int = 16, vocab: int = 128) -> None:
        self.tokens = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def hf_trainer(output_dir: str, model_seed: int, callbacks: tuple = ()):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class ConsolidateAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 1:  # a task boundary before the checkpoint at step 2
                unwrap(optimizer).consolidate()

    torch.manual_seed(model_seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=4, save_steps=2, per_device_train_batch_size=4, seed=0,
        weight_decay=0.01, use_cpu=True, report_to="none", dataloader_num_workers=0, disable_tqdm=True,
        logging_steps=1,
    )
    return transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=RandomTokens(),
        callbacks=[ConsolidateAt(), *callbacks], optimizer_cls_and_kwargs=(MaskedAdamW, dict(OPTIONS)),
    )


def test_hf_trainer_resume_reproduces_uninterrupted_run(tmp_path):
    uninterrupted = hf_trainer(str(tmp_path / "a"), model_seed=0)
    uninterrupted.train()
    opt = unwrap(uninterrupted.optimizer)
    assert isinstance(opt, MaskedAdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # Trainer's decay split
    assert all(g["initial_lr"] == OPTIONS["lr"] and g["density"] == 0.5 for g in opt.param_groups)
    assert all(s["frozen"] > 0 for s in opt.mask_stats())

    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all("anchor" in state and "anchor_param" in state for state in saved["state"].values())

    resumed = hf_trainer(str(tmp_path / "b"), model_seed=1)  # other initial weights: the checkpoint's must win
    resumed.train(resume_from_checkpoint=str(checkpoint))
    names = [n for n, _ in uninterrupted.model.named_parameters()]
    for name, p, q in zip(names, resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(p, q), name
    assert_bitwise_equal(snapshot(unwrap(resumed.optimizer)), snapshot(opt))
    losses = [h["loss"] for h in uninterrupted.state.log_history if "loss" in h]
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == losses  # 1-2 from the checkpoint


def test_hf_density_callback_schedules_and_resumes(tmp_path):
    """``integrations.hf.DensityCallback``: the density follows the schedule per optimizer
    step, and a run resumed from a checkpoint continues it exactly (nothing saved but what the
    Trainer saves)."""
    transformers = pytest.importorskip("transformers")
    from masked_optim.integrations.hf import DensityCallback

    with pytest.raises(ValueError, match="Invalid end: 1.5"):
        DensityCallback(end=1.5, steps=3)

    class Densities(transformers.TrainerCallback):  # the density each optimizer step runs with
        def __init__(self) -> None:
            self.seen = []

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.seen.append((state.global_step, unwrap(optimizer).param_groups[0]["density"]))

    runs = []
    for name, resume in (("a", None), ("b", tmp_path / "a" / "checkpoint-2")):
        seen = Densities()
        trainer = hf_trainer(str(tmp_path / name), model_seed=0, callbacks=(DensityCallback(end=0.2, steps=3), seen))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs.append((seen.seen, snapshot(unwrap(trainer.optimizer))))
    expected = [(step, pytest.approx(0.5 - 0.1 * step)) for step in range(4)]
    assert runs[0][0] == expected and runs[1][0] == expected[2:]
    assert_bitwise_equal(runs[1][1], runs[0][1])


def test_hf_consolidate_callback_observes_the_old_batches_then_consolidates(tmp_path):
    """``integrations.hf.ConsolidateCallback``: before the first step, the Trainer's own
    optimizer observes the old batches (eval mode) and consolidates; its anchors are those of a
    twin optimizer given the same batches by hand. A resumed run skips it (the checkpoint holds
    the anchors) and still ends bit-identical."""
    transformers = pytest.importorskip("transformers")
    import copy

    from masked_optim.integrations.hf import ConsolidateCallback

    tokens = torch.randint(0, 128, (20, 16), generator=torch.Generator().manual_seed(7))
    old = [{"input_ids": tokens[i:i + 4], "labels": tokens[i:i + 4]} for i in range(0, 20, 4)]
    with pytest.raises(ValueError, match=r"Invalid batches: a dict"):
        ConsolidateCallback(old[0])
    with pytest.raises(ValueError, match=r"Invalid max_batches: 0"):
        ConsolidateCallback(old, max_batches=0)

    class AtStart(transformers.TrainerCallback):  # what the optimizer holds when the first step begins
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 0:
                opt = unwrap(optimizer)
                self.groups = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
                               for g in opt.param_groups]
                self.anchors = {id(p): opt.state[p]["anchor"].clone() for g in opt.param_groups for p in g["params"]}
                self.training, self.grads = model.training, [p.grad for p in model.parameters()]

    runs = []
    for name, resume in (("a", None), ("b", tmp_path / "a" / "checkpoint-2")):
        callback, start = ConsolidateCallback(old, max_batches=3), AtStart()
        trainer = hf_trainer(str(tmp_path / name), model_seed=0, callbacks=(callback, start))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runs.append((callback.observed, snapshot(unwrap(trainer.optimizer))))
    assert [observed for observed, _ in runs] == [3, 0]
    assert_bitwise_equal(runs[1][1], runs[0][1])

    # the twin: the same initial weights and param groups, the first 3 batches observed by hand
    first = ConsolidateCallback(old, max_batches=3)
    start = AtStart()
    trainer = hf_trainer(str(tmp_path / "c"), model_seed=0, callbacks=(first, start))
    initial = copy.deepcopy(trainer.model)
    trainer.train()
    assert start.training and all(g is None for g in start.grads)  # train mode back, grads cleared
    by_id = dict(zip((id(p) for p in trainer.model.parameters()), initial.parameters()))
    twin = MaskedAdamW([{"params": [by_id[i] for i in ids], **options} for ids, options in start.groups])
    initial.eval()
    for batch in old[:3]:
        initial.zero_grad(set_to_none=True)
        initial(**batch).loss.backward()
        twin.observe()
    twin.consolidate()
    for i, p in by_id.items():
        assert_close(start.anchors[i], twin.state[p]["anchor"], "anchor")


def test_hf_consolidate_callback_takes_exactly_max_batches_and_names_bad_batches(tmp_path):
    transformers = pytest.importorskip("transformers")
    from masked_optim.integrations.hf import ConsolidateCallback

    tokens = torch.randint(0, 128, (20, 16), generator=torch.Generator().manual_seed(7))
    batches = iter([{"input_ids": tokens[i:i + 4], "labels": tokens[i:i + 4]} for i in range(0, 20, 4)])
    callback = ConsolidateCallback(batches, max_batches=2)
    hf_trainer(str(tmp_path / "a"), model_seed=0, callbacks=(callback,)).train()
    assert callback.observed == 2 and len(list(batches)) == 3  # the iterator lost no batch

    for bad, message in (([[tokens[:4], tokens[:4]]], r"batch 0 is a list \(expected a mapping of model inputs"),
                         ([{"input_ids": tokens[:4]}], r"the model returned no loss for batch 0 \(give 'labels'\)")):
        trainer = hf_trainer(str(tmp_path / "b"), model_seed=0, callbacks=(ConsolidateCallback(bad),))
        with pytest.raises(ValueError, match=r"Invalid batches: " + message):
            trainer.train()

    class LateAnchorDecay(transformers.TrainerCallback):  # a restoring force asked for after the boundary
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            unwrap(optimizer).param_groups[0]["anchor_decay"] = 0.0  # none at the step-1 consolidate()

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                unwrap(optimizer).param_groups[0]["anchor_decay"] = 1.0

    trainer = hf_trainer(str(tmp_path / "c"), model_seed=0, callbacks=(LateAnchorDecay(),))
    with pytest.warns(UserWarning, match="anchor_decay > 0 but tensors without anchor_param") as record:
        trainer.train()  # the warning names this line, not accelerate's or the Trainer's
    assert {w.filename for w in record if "anchor_param" in str(w.message)} == {__file__}


def test_hf_consolidate_callback_refuses_another_optimizer(tmp_path):
    pytest.importorskip("transformers")
    from masked_optim.integrations.hf import ConsolidateCallback

    trainer = hf_trainer(str(tmp_path), model_seed=0, callbacks=(ConsolidateCallback([{"input_ids": torch.zeros(1, 4)}]),))
    trainer.optimizer_cls_and_kwargs = (torch.optim.AdamW, {"lr": 1e-3})
    with pytest.raises(TypeError, match=r"ConsolidateCallback needs the Trainer's optimizer to be a MaskedAdamW, got AdamW"):
        trainer.train()


def test_lightning_warnings_name_the_users_line(tmp_path):
    """A warning from a step Lightning drives (here: a restoring force asked for after the
    boundary) names the line that called trainer.fit, not Lightning's loop."""
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return MaskedAdamW(self.parameters(), lr=1e-2)

    class Boundary(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, index):
            if index == 1:
                trainer.optimizers[0].consolidate()  # no anchor_param: anchor_decay is 0 here
            if index == 2:
                trainer.optimizers[0].param_groups[0]["anchor_decay"] = 1.0

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, callbacks=[Boundary()],
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="anchor_decay > 0 but tensors without anchor_param") as record:
        trainer.fit(Module(), data)
    assert {w.filename for w in record if "anchor_param" in str(w.message)} == {__file__}


@pytest.mark.parametrize("fused", [None, True])
def test_lightning_closure_bf16_mixed_and_clipping(tmp_path, fused):
    """Lightning steps through its closure under bf16 autocast and clips the grads; it refuses
    ``gradient_clip_val`` for optimizers that unscale inside their step (``fused=True``, as
    torch's fused AdamW)."""
    lightning = pytest.importorskip("lightning")

    class Recording(MaskedAdamW):
        """Records, per step, whether a closure came in and how many training_steps it ran."""

        def step(self, closure=None):
            before = self.module.training_steps
            loss = super().step(closure)
            self.calls.append((closure is not None, self.module.training_steps - before))
            return loss

    class Regression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            self.training_steps, self.losses, self.dtypes = 0, [], set()

        def training_step(self, batch, index):
            self.training_steps += 1
            x, y = batch
            out = self.net(x)
            self.dtypes.add(out.dtype)
            loss = torch.nn.functional.mse_loss(out.float(), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = Recording(self.parameters(), lr=1e-2, weight_decay=0.0, density=0.5, fused=fused)
            opt.module, opt.calls = self, []
            return opt

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    module = Regression()
    trainer = lightning.Trainer(
        accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0, max_steps=40, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    if fused:
        with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
            trainer.fit(module, data)
        return
    trainer.fit(module, data)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Recording)
    assert opt.calls == [(True, 1)] * 40  # every step came with a closure, which our step ran once
    assert module.dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert sum(module.losses[-5:]) < 0.5 * sum(module.losses[:5])
    stats = opt.mask_stats()[0]
    assert abs(stats["realised_density"] - 0.5) <= 0.05 and stats["frozen"] > 0


def test_lightning_density_callback_schedules_and_resumes(tmp_path):
    """``integrations.lightning.DensityCallback`` with gradient accumulation: the density
    follows the schedule per optimizer step, and a fit resumed from a checkpoint continues it."""
    lightning = pytest.importorskip("lightning")
    from masked_optim.integrations.lightning import DensityCallback

    class Regression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(8, 1)
            self.seen = []

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):
            self.seen.append((self.trainer.global_step, optimizer.param_groups[0]["density"]))

        def configure_optimizers(self):
            return MaskedAdamW(self.parameters(), lr=1e-2, density=0.5)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)  # an epoch: 2 steps

    def fit(max_steps: int, checkpoint=None):
        module = Regression()
        trainer = lightning.Trainer(
            accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(tmp_path), callbacks=[DensityCallback(end=0.2, steps=3)],
        )
        trainer.fit(module, data, ckpt_path=checkpoint)
        return trainer, module

    _, whole = fit(4)
    part_trainer, _ = fit(2)
    part_trainer.save_checkpoint(tmp_path / "part.ckpt")
    _, resumed = fit(4, str(tmp_path / "part.ckpt"))
    # (the weights are not compared: Lightning's resume from a checkpoint saved after fit() is
    # not bit-exact here with torch's AdamW either)
    expected = [(step, pytest.approx(0.5 - 0.1 * step)) for step in range(4)]
    assert whole.seen == expected and resumed.seen == expected[2:]


def test_lightning_density_callback_names_a_bad_optimizer_index():
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from masked_optim.integrations.lightning import DensityCallback

    trainer = SimpleNamespace(optimizers=[MaskedAdamW([torch.zeros(1)])], global_step=0)
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: 1 \(the trainer has 1 optimizer\(s\)\)"):
        DensityCallback(end=0.1, steps=5, optimizer_index=1).on_train_start(trainer, None)


def test_lightning_consolidate_callback_observes_the_old_batches_then_consolidates(tmp_path):
    """``integrations.lightning.ConsolidateCallback``: before the first step the trainer's
    optimizer observes the old batches through ``training_step`` (eval mode, the trainer's bf16
    autocast, its ``self.log`` calls dropped) and consolidates; the anchors are those of a twin
    given the same batches by hand. A fit resumed from a checkpoint skips it."""
    lightning = pytest.importorskip("lightning")
    import copy

    from masked_optim.integrations.lightning import ConsolidateCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
            self.calls = []  # (training mode, output dtype, loss) per training_step

        def training_step(self, batch, index):
            x, y = batch
            out = self.net(x)
            loss = torch.nn.functional.mse_loss(out.float(), y)
            self.calls.append((self.training, out.dtype, loss.item()))
            self.log("train_loss", loss)
            return {"loss": loss}

        def configure_optimizers(self):
            return MaskedAdamW(self.parameters(), lr=1e-2, anchor_decay=2.0)

    class AtStart(lightning.Callback):  # what the module and optimizer hold once the callback ran
        def on_train_start(self, trainer, module):
            optimizer = trainer.optimizers[0]
            self.anchors = [optimizer.state[p]["anchor"].clone() for p in module.parameters()]
            self.calls, self.training = list(module.calls), module.training
            self.grads = [p.grad for p in module.parameters()]

    gen = torch.Generator().manual_seed(3)
    old = [(torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(4)]
    x = torch.randn(32, 6, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=8)

    def fit(callbacks, max_steps=2, checkpoint=None):
        module = Module()
        initial = copy.deepcopy(module)
        trainer = lightning.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=max_steps, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                    default_root_dir=str(tmp_path), callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=checkpoint)
        return trainer, module, initial

    callback, start = ConsolidateCallback(old, max_batches=3), AtStart()
    trainer, module, initial = fit([callback, start])
    assert callback.observed == 3
    # eval mode and the trainer's autocast during the passes; train mode back and no grads after
    assert [(training, dtype) for training, dtype, _ in start.calls] == [(False, torch.bfloat16)] * 3
    assert start.training and all(g is None for g in start.grads)
    # what training_step logged in the passes was dropped: the trainer holds the last step's loss
    assert len(module.calls) == 5 and module.calls[-1][0]
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(module.calls[-1][2])
    twin = MaskedAdamW(initial.parameters(), lr=1e-2, anchor_decay=2.0)
    initial.eval()
    for bx, by in old[:3]:
        initial.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = initial.net(bx)
        torch.nn.functional.mse_loss(out.float(), by).backward()
        twin.observe()
    twin.consolidate()
    for got, p in zip(start.anchors, initial.parameters()):
        assert_close(got, twin.state[p]["anchor"], "anchor")

    trainer.save_checkpoint(tmp_path / "part.ckpt")
    resumed = ConsolidateCallback(old)
    _, module, _ = fit([resumed], max_steps=3, checkpoint=str(tmp_path / "part.ckpt"))
    assert resumed.observed == 0


def test_lightning_consolidate_callback_errors(tmp_path):
    lightning = pytest.importorskip("lightning")
    from masked_optim.integrations.lightning import ConsolidateCallback

    with pytest.raises(ValueError, match=r"Invalid loss_fn: 3"):
        ConsolidateCallback([1], loss_fn=3)
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: -1"):
        ConsolidateCallback([1], optimizer_index=-1)
    with pytest.raises(ValueError, match=r"Invalid how: 'min'"):
        ConsolidateCallback([1], how="min")

    class Module(lightning.LightningModule):
        def __init__(self, manual: bool = False, make=MaskedAdamW) -> None:
            super().__init__()
            self.net, self.make = torch.nn.Linear(4, 1), make
            self.automatic_optimization = not manual

        def training_step(self, batch, index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if not self.automatic_optimization:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def configure_optimizers(self):
            return self.make(self.parameters(), lr=1e-2)

    x = torch.randn(8, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)
    old = [(x[:4], x[:4, :1])]

    def fit(module, callback):
        trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    default_root_dir=str(tmp_path), callbacks=[callback])
        trainer.fit(module, data)

    with pytest.raises(TypeError, match=r"needs the trainer's optimizer to be a MaskedAdamW, got AdamW"):
        fit(Module(make=torch.optim.AdamW), ConsolidateCallback(old))
    with pytest.raises(ValueError, match=r"Invalid optimizer_index: 1 \(the trainer has 1 optimizer\(s\)\)"):
        fit(Module(), ConsolidateCallback(old, optimizer_index=1))
    module = Module(manual=True)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"manual optimization.*pass loss_fn="):
        fit(module, ConsolidateCallback(old))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    with pytest.raises(ValueError, match=r"Invalid batches: no loss tensor for batch 0 \(got NoneType\)"):
        fit(Module(), ConsolidateCallback(old, loss_fn=lambda module, batch: None))
    # manual optimization with a loss_fn: observed through it, the optimizer never stepped by it
    callback = ConsolidateCallback(old, loss_fn=lambda m, b: torch.nn.functional.mse_loss(m.net(b[0]), b[1]))
    fit(Module(manual=True), callback)
    assert callback.observed == 1


def test_consolidate_callbacks_check_their_options_when_made_and_refuse_batches_that_yield_none():
    """Both callbacks' shared checks (``integrations.check_consolidate_options``) at
    construction: ``max_batches`` an int >= 1 (a bool is not a count), ``reset_moments`` a bool;
    ``take_batches`` takes exactly ``max_batches`` (an iterator loses no batch beyond them) and
    refuses batches that yield none (an exhausted iterator) before anything is observed."""
    from masked_optim.integrations import check_consolidate_options, take_batches

    for max_batches in (True, 0, 1.5):
        with pytest.raises(ValueError, match=rf"Invalid max_batches: {max_batches!r} \(must be an int >= 1 or None\)"):
            check_consolidate_options([1], max_batches, "max", False)
    for reset_moments in ("yes", 1, None):
        with pytest.raises(ValueError, match=rf"Invalid reset_moments: {reset_moments!r} \(must be a bool\)"):
            check_consolidate_options([1], None, "max", reset_moments)
    check_consolidate_options(iter([1]), 1, "sum", True)
    batches = iter([1, 2, 3])
    assert take_batches(batches, 2) == [1, 2] and list(batches) == [3]
    for empty in (batches, []):
        with pytest.raises(ValueError, match=r"batches yielded no batch \(an exhausted iterator\?\)"):
            take_batches(empty, None)


def test_observing_the_old_batches_restores_the_models_mode_and_leaves_no_grads():
    """``integrations.observe_batches`` (both callbacks' passes): every pass runs in eval mode
    (no dropout), the model's own mode comes back afterwards (eval included) and no grad is
    left; ``observed`` is told the count after each batch."""
    import contextlib

    from masked_optim.integrations import observe_batches

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    opt = MaskedAdamW(model.parameters())
    x = torch.randn(8, 4)
    for training in (True, False):
        model.train(training)
        modes, counts = [], []

        def loss_of(index, batch):
            modes.append(model.training)
            return model(batch).pow(2).sum()

        observe_batches(opt, model, [x, x], loss_of, contextlib.nullcontext, counts.append)
        assert modes == [False, False] and counts == [1, 2]
        assert all(module.training is training for module in model.modules())
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reset_moments", [False, True])
def test_the_callbacks_boundary_consolidates_as_told(reset_moments):
    """``integrations.observe_and_consolidate`` (both callbacks' boundary) consolidates with the
    callback's ``how`` and ``reset_moments``: the moments and step counts restart only when told."""
    import contextlib
    from types import SimpleNamespace

    from masked_optim.integrations import observe_and_consolidate

    model = torch.nn.Linear(4, 2)
    opt = MaskedAdamW(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    model(x).pow(2).sum().backward()
    opt.step()
    callback = SimpleNamespace(how="sum", reset_moments=reset_moments)
    observe_and_consolidate(callback, opt, model, [x], lambda index, batch: model(batch).pow(2).sum(),
                            contextlib.nullcontext)
    assert callback.observed == 1
    for p in model.parameters():
        state = opt.state[p]
        assert "anchor" in state and state["importance_step"] == 0
        assert bool(state["step"] == 0) is reset_moments and bool(state["exp_avg"].eq(0).all()) is reset_moments


@pytest.mark.slow
def test_lightning_consolidate_callback_under_ddp_gives_every_rank_the_same_anchors(tmp_path):
    """Two CPU ranks (``ddp_spawn``, gloo), each observing its own old batches: the callback's
    passes bypass DDP's wrapper, so it averages the grads itself; the ranks' anchors agree."""
    lightning = pytest.importorskip("lightning")
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from masked_optim.integrations.lightning import ConsolidateCallback
    from tests.lightning_ddp_worker import AnchorsAgree, Module, RankBatches

    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=8)
    trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(tmp_path), callbacks=[ConsolidateCallback(RankBatches()), AnchorsAgree()])
    trainer.fit(Module(), data)


def test_lightning_consolidate_callback_on_a_second_fit_and_a_modules_own_log(tmp_path):
    """A second ``fit()`` of the same trainer (not a resume: no ckpt_path) observes and
    consolidates again on its fresh optimizer; a module's own ``log`` instance attribute is put
    back after the passes."""
    lightning = pytest.importorskip("lightning")
    from masked_optim.integrations.lightning import ConsolidateCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, index):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return MaskedAdamW(self.parameters(), lr=1e-2, anchor_decay=1.0)

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)
    callback = ConsolidateCallback([(x[:4], x[:4, :1]), (x[4:], x[4:, :1])])
    module = Module()
    logged = []
    module.log = lambda name, value, **kwargs: logged.append(name)  # the module's own instance attribute
    trainer = lightning.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                                callbacks=[callback])
    trainer.fit(module, data)
    assert callback.observed == 2 and logged == ["loss", "loss"]  # the training steps' logs only
    callback.observed = 0
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(module, data)
    assert callback.observed == 2
    assert all("anchor" in trainer.optimizers[0].state[p] for p in module.parameters())


def test_collective_device_follows_the_default_groups_backends(monkeypatch):
    """The callbacks' collectives go on the tensors' own device where the default process group
    has a backend for it, else the CPU (``init_process_group()`` without a backend on a CPU
    machine is ``cpu:gloo``), else the accelerator; a clear error without any."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from masked_optim.integrations import _backend_device_types, _collective_device

    assert _backend_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert _backend_device_types("gloo") == {"cpu"} and _backend_device_types("nccl") == {"cuda"}
    assert _backend_device_types("undefined") == set()

    def config(text):
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: text)

    config("cpu:gloo")
    assert _collective_device(torch.device("cpu")) == torch.device("cpu")
    assert _collective_device(torch.device("cuda", 1)) == torch.device("cpu")
    config("cpu:gloo,cuda:nccl")
    assert _collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    config("nccl")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=r"has no backend for cpu tensors \(it has \['cuda'\]\) and there is no accelerator"):
        _collective_device(torch.device("cpu"))
