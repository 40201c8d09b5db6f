"""Fine-tune a Hugging Face causal LM with MaskedAdamW, keeping what it knew before.

The recipe, for any model the Trainer can train:
  1. measure importance on the old data: forward + backward, ``opt.observe()`` (no update);
  2. ``opt.consolidate()``: the importance becomes the anchor, the weights become theta*;
  3. fine-tune on the new data with ``Trainer(optimizer_cls_and_kwargs=(MaskedAdamW, {...}))``:
     important weights are pulled back toward theta* (``anchor_decay``); with ``--density``
     below 1 the protect mask (the default ``--mask``) also freezes the most important
     elements, letting ``density`` of them move.
Steps 1-2 run in ``masked_optim.integrations.hf.ConsolidateCallback`` when training starts (the
Trainer creates the optimizer inside ``train()``).
Note: with ``optimizer_cls_and_kwargs`` the Trainer does not pass ``learning_rate`` to the
optimizer; it goes in the kwargs (the Trainer's decay/no-decay split still applies).

Toy size (CPU, about 15 s; no downloads): a tiny random GPT-2 is first trained on "old"
sequences (a random Markov chain) so that it has something to forget, then fine-tuned on "new"
ones; the script prints the loss on both before and after. The defaults follow the README's
"Choosing settings": density 1, lr 3e-3 x anchor_decay 10 (a pull of 0.03), eps 1e-3, 16
calibration batches. With --baseline it also fine-tunes the same model as plain AdamW and
reports it twice: after as many steps, and at the first step where its new-data loss is as low
as MaskedAdamW's (protection costs new-task progress at equal steps, so compare at equal
progress too). Measured (2-core CPU, torch 2.13), old-data loss from 1.68:

    settings                        MaskedAdamW old / new   AdamW, same steps   AdamW, same new loss
    defaults                        4.13 / 2.46             5.58 / 2.00         4.98 (step 34 of 50)
    --density 0.3 (protect on top)  3.35 / 3.59             5.58 / 2.00         4.22 (step 15)
    --eps 1e-8                      4.61 / 2.20             5.58 / 2.00         5.26 (step 42)

    OMP_NUM_THREADS=1 python examples/hf_finetune.py --baseline

With --output-dir D and --save-steps N each run keeps its checkpoints apart (D/pretrain,
D/fine-tune, D/baseline); --resume D/fine-tune/checkpoint-N continues the fine-tuning exactly.

Real size (GPU; any causal LM and two plain-text files; not run at this size yet). The pull
toward theta* scales with lr x anchor_decay, which was 0.01-0.03 in the experiments (README,
"Choosing settings"): at lr 5e-5 that is anchor_decay 200-600, with density 1 to start:

    python examples/hf_finetune.py --model-name gpt2 --old-text old.txt --new-text new.txt \
        --steps 2000 --batch-size 8 --seq-len 512 --lr 5e-5 --bf16 --density 1 --anchor-decay 200
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from masked_optim import MaskedAdamW
from masked_optim.integrations.hf import ConsolidateCallback


class Blocks(Dataset):
    """Token blocks of one length, as causal-LM examples (labels = inputs)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def markov_blocks(seed: int, count: int, length: int, vocab: int, successors: int = 4) -> Blocks:
    """Sequences of a random Markov chain in which every token has a few likely successors."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, successors), generator=gen)
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (count,), generator=gen)
    for t in range(1, length):
        pick = torch.randint(0, successors, (count,), generator=gen)
        tokens[:, t] = table[tokens[:, t - 1], pick]
    return Blocks(tokens)


def text_blocks(path: str, tokenizer: Any, length: int) -> Blocks:
    """A text file, tokenized and cut into blocks of ``length`` tokens."""
    with open(path, encoding="utf-8") as handle:
        ids = tokenizer(handle.read(), return_tensors="pt")["input_ids"][0]
    usable = len(ids) // length * length
    if usable == 0:
        raise ValueError(f"Invalid text file: {path!r} has fewer than --seq-len={length} tokens")
    return Blocks(ids[:usable].view(-1, length))


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Blocks, Blocks]:
    """The model and the old/new data: a pretrained checkpoint and text, or the toy set-up."""
    import transformers

    if args.model_name:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_name)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_name)
        return model, text_blocks(args.old_text, tokenizer, args.seq_len), text_blocks(args.new_text, tokenizer, args.seq_len)
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=2, vocab_size=args.vocab, n_positions=args.seq_len,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    old = markov_blocks(args.seed + 1, args.examples, args.seq_len, args.vocab)
    new = markov_blocks(args.seed + 2, args.examples, args.seq_len, args.vocab)
    return model, old, new


def batches(data: Blocks, batch_size: int, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    return [{k: v.to(device) for k, v in batch.items()} for batch, _ in zip(loader, range(count))]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: Blocks, args: argparse.Namespace) -> float:
    """Mean LM loss over the first ``--eval-batches`` batches of ``data``."""
    model.eval()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        losses = [model(**batch).loss.float().item() for batch in batches(data, args.batch_size, args.eval_batches, device)]
    return sum(losses) / len(losses)


class Trajectory:
    """A Trainer callback: the old and new losses after every step (the baseline's, to compare
    at equal progress on the new data as well as at equal steps)."""

    def __init__(self, model: torch.nn.Module, old: Blocks, new: Blocks, args: argparse.Namespace) -> None:
        import transformers

        self.model, self.old, self.new, self.args = model, old, new, args
        self.losses: list[tuple[int, float, float]] = []  # (step, old loss, new loss)
        outer = self

        class Callback(transformers.TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                training = outer.model.training
                outer.losses.append((state.global_step, mean_loss(outer.model, outer.old, outer.args),
                                     mean_loss(outer.model, outer.new, outer.args)))
                outer.model.train(training)

        self.callback = Callback()


#: each run's subdirectory of --output-dir: one run's checkpoints never mix with another's
RUNS = ("pretrain", "fine-tune", "baseline")


def train(model: torch.nn.Module, data: Blocks, steps: int, options: dict[str, Any], args: argparse.Namespace,
          run: str, callbacks: Optional[list] = None, resume: Optional[str] = None) -> MaskedAdamW:
    """``steps`` Trainer steps on ``data`` with MaskedAdamW(**options), checkpoints (if any) in
    ``--output-dir``/``run``; returns the optimizer."""
    import transformers

    plain = set(options) <= {"lr", "weight_decay"}  # density 1, no anchor: AdamW's steps exactly
    print(f"--- {run}: {steps} Trainer steps, MaskedAdamW({', '.join(f'{k}={v}' for k, v in options.items())})"
          + (" = AdamW" if plain else ""), flush=True)
    train_args = transformers.TrainingArguments(
        output_dir=os.path.join(args.output_dir, run), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=options["lr"], weight_decay=args.weight_decay, lr_scheduler_type="constant",
        bf16=args.bf16, use_cpu=args.device == "cpu", seed=args.seed, report_to="none",
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        logging_steps=max(1, steps // 5), disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=train_args, train_dataset=data, callbacks=callbacks or [],
        optimizer_cls_and_kwargs=(MaskedAdamW, options),
    )
    trainer.train(resume_from_checkpoint=resume)
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model-name", help="a Hugging Face causal LM (then --old-text and --new-text are required)")
    add("--old-text", help="text the model should keep knowing (for calibration and evaluation)")
    add("--new-text", help="text to fine-tune on")
    add("--steps", type=int, default=50, help="fine-tuning steps on the new data")
    add("--pretrain-steps", type=int, default=100, help="toy only: steps on the old data first")
    add("--batch-size", type=int, default=16)
    add("--seq-len", type=int, default=32)
    add("--lr", type=float, default=3e-3)
    add("--weight-decay", type=float, default=0.0)
    add("--eps", type=float, default=1e-3, help="Adam's eps for the MaskedAdamW run (README, Choosing settings, step 3)")
    add("--density", type=float, default=1.0, help="fraction of elements updated per step (protect: that move)")
    add("--mask", choices=("select", "protect"), default="protect")
    add("--anchor-decay", type=float, default=10.0, help="restoring force toward the consolidated weights")
    add("--protect-strength", type=float, default=0.0)
    add("--calibration-batches", type=int, default=16, help="old-data batches for opt.observe()")
    add("--eval-batches", type=int, default=4)
    add("--baseline", action="store_true", help="also fine-tune a copy with plain AdamW settings (density 1, no anchor)")
    add("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--output-dir", default=None, help="Trainer output directory (default: a temporary one)")
    add("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    add("--resume", default=None, help="checkpoint to resume the fine-tuning from (OUTPUT_DIR/fine-tune/checkpoint-N)")
    add("--seed", type=int, default=0)
    add("--layers", type=int, default=2, help="toy model: GPT-2 layers")
    add("--width", type=int, default=64, help="toy model: embedding width")
    add("--vocab", type=int, default=128, help="toy model: vocabulary size")
    add("--examples", type=int, default=512, help="toy data: sequences per task")
    args = parser.parse_args(argv)
    if args.model_name and not (args.old_text and args.new_text):
        parser.error("--model-name needs --old-text and --new-text")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Run the example; returns the losses it prints (``old_*``, ``new_*``) and the mask stats."""
    args = parse(argv)
    with tempfile.TemporaryDirectory() as scratch:
        args.output_dir = args.output_dir or scratch
        model, old, new = build(args)
        model.to(args.device)
        if not args.model_name:  # give the random toy model some old knowledge to lose
            train(model, old, args.pretrain_steps, dict(lr=args.lr, weight_decay=args.weight_decay), args, "pretrain")
        results = {"old_before": mean_loss(model, old, args), "new_before": mean_loss(model, new, args)}
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.baseline else None
        options = dict(lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, density=args.density, mask=args.mask,
                       anchor_decay=args.anchor_decay, protect_strength=args.protect_strength)
        opt = train(model, new, args.steps, options, args, "fine-tune", callbacks=[ConsolidateCallback(batches(old, args.batch_size, args.calibration_batches, "cpu"))], resume=args.resume)
        results.update(old_after=mean_loss(model, old, args), new_after=mean_loss(model, new, args))
        stats = [s for s in opt.mask_stats() if s is not None]
        results["realised_density"] = sum(s["elements"] - s["frozen"] for s in stats) / sum(s["elements"] for s in stats)
        if reference is not None:
            model.load_state_dict(reference)
            trajectory = Trajectory(model, old, new, args)
            train(model, new, args.steps, dict(lr=args.lr, weight_decay=args.weight_decay), args, "baseline",
                  callbacks=[trajectory.callback])
            results.update(old_after_adamw=mean_loss(model, old, args), new_after_adamw=mean_loss(model, new, args))
            # AdamW at the new-task progress MaskedAdamW made: its first step with a new loss as low
            matched = next(((step, o) for step, o, n in trajectory.losses if n <= results["new_after"]), None)
            if matched is not None:
                results.update(adamw_matched_step=float(matched[0]), old_after_adamw_matched=matched[1])
    print("--- losses (old: the data the model should keep knowing; new: the fine-tuning data)")
    for key, value in results.items():
        plain = "density" in key or key.endswith("step")
        print(f"{key:>24}: {value:.4f}" + ("" if plain else f"  (perplexity {math.exp(value):.1f})"))
    return results


if __name__ == "__main__":
    main()
