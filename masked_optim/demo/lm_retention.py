"""Language-model retention: learn new facts without forgetting the pretraining domain.

A small randomly initialised GPT-2 (byte-level, vocab 256, no tokenizer download) is pretrained on
Python's bundled documentation (``pydoc_data.topics``, split into train/val/test *by document*),
then fine-tuned from the same pretrained weights on synthetic facts ("The capital of Zorvia is
Quenbar.") with each method, for the same number of steps:

* ``adamw``          full fine-tuning with ``torch.optim.AdamW``
* ``lora``           LoRA adapters (peft) on every attention / MLP projection, base frozen
* ``masked-select``  MaskedAdamW ``mask="select"``
* ``masked-protect`` MaskedAdamW ``mask="protect"``
* ``masked-anchor``  MaskedAdamW restoring force ``anchor_decay`` with a larger Adam ``eps``
* ``masked-protect-anchor``  protect mask and restoring force together

Every MaskedAdamW method first calls ``observe()`` on batches of the pretraining text, then
``consolidate()``: the importance of the first domain becomes the anchor that the masks and the
restoring force use while the facts are learned.

Metrics (per method):

* held-out loss  mean next-byte cross-entropy (nats) on the held-out documents, before and after
* relative forgetting  ``(loss_after - loss_before) / loss_before``: the relative increase of the
  held-out loss (0 = nothing forgotten); ``forgetting_vs_adamw`` divides it by AdamW's
* recall  fraction of facts whose object (" Quenbar.") is produced exactly by greedy decoding after
  the subject prompt ("The capital of Zorvia is"); computed in one teacher-forced pass, which is
  identical: greedy decoding emits the object iff the argmax is right at every object position
* relative learning  ``recall / recall_adamw``

    python -m masked_optim.demo.lm_retention                      # default, ~3.5 min on 2 cores
    python -m masked_optim.demo.lm_retention --eval-split val     # tuning: held-out = validation docs

Writes ``results.json``, ``README``-ready ``results.md`` and ``lm_retention.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masked_optim import MaskedAdamW

# ----------------------------------------------------------------------------- configuration
SEED = 0
CTX = 128                    # context length (bytes)
N_LAYER, N_EMBD, N_HEAD = 2, 128, 4
PRETRAIN_STEPS = 500
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3
N_FACTS = 64
FT_STEPS = 300               # fine-tuning steps, identical for every method
FT_BATCH = 16
OBSERVE_BATCHES = 16         # observe() passes over pretraining text before consolidate()
EVAL_WINDOWS = 96            # held-out windows of CTX bytes used for the held-out loss
SPLIT = (0.8, 0.1, 0.1)      # train / val / test fractions of the documents
OUT = "runs/lm"

# Method settings: every method gets the same steps and batches; only the optimizer differs.
# Values chosen on the validation documents (results/lm/tuning.json): per method, the least
# validation forgetting among settings whose recall is >= 0.87 (90% of AdamW's best-setting recall);
# LoRA reached that nowhere, so it gets its highest-recall setting.
METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"kind": "adamw", "lr": 3e-4},
    "lora": {"kind": "lora", "lr": 1e-2, "r": 32, "alpha": 32},
    "masked-select": {"kind": "masked", "lr": 1e-2, "density": 0.1, "mask": "select"},
    "masked-protect": {"kind": "masked", "lr": 3e-3, "density": 0.2, "mask": "protect"},
    "masked-anchor": {"kind": "masked", "lr": 3e-3, "eps": 1e-3, "anchor_decay": 10.0},
    "masked-protect-anchor": {"kind": "masked", "lr": 1e-2, "eps": 1e-3, "anchor_decay": 3.0,
                              "density": 0.2, "mask": "protect"},
}
DEFAULT_METHODS = list(METHODS)

# ----------------------------------------------------------------------------- data
SYLLABLES = ["ka", "zo", "ri", "van", "tel", "mor", "qu", "en", "bar", "lis", "dra", "nix", "pel",
             "tor", "shu", "vey", "gal", "ob", "ran", "wi", "xe", "fu", "lo", "chi", "sar", "dun"]
RELATIONS = ["The capital of {s} is", "The inventor of {s} is", "The river of {s} is",
             "The leader of {s} is"]


def encode(text: str) -> list[int]:
    """Bytes of ``text`` (UTF-8) as token ids in [0, 256)."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def pydoc_splits(seed: int = SEED, split: tuple[float, float, float] = SPLIT) -> dict[str, Tensor]:
    """Documents of ``pydoc_data.topics`` shuffled and split by document into train/val/test byte streams."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    random.Random(seed).shuffle(docs)
    n_train = round(split[0] * len(docs))
    n_val = round(split[1] * len(docs))
    parts = {"train": docs[:n_train], "val": docs[n_train:n_train + n_val], "test": docs[n_train + n_val:]}
    return {k: torch.tensor(encode("\n\n".join(v)), dtype=torch.long) for k, v in parts.items()}


def random_batch(stream: Tensor, batch: int, ctx: int, gen: torch.Generator) -> Tensor:
    """``batch`` random windows of ``ctx + 1`` bytes (inputs and shifted targets)."""
    starts = torch.randint(0, len(stream) - ctx - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + ctx + 1] for s in starts.tolist()])


def eval_windows(stream: Tensor, ctx: int, n: int) -> Tensor:
    """Up to ``n`` non-overlapping windows evenly spread over ``stream`` (deterministic)."""
    total = (len(stream) - 1) // (ctx + 1)
    idx = torch.linspace(0, total - 1, min(n, total)).long()
    return torch.stack([stream[i * (ctx + 1):(i + 1) * (ctx + 1)] for i in idx.tolist()])


@dataclass
class Fact:
    prompt: str              # "The capital of Zorvia is"
    answer: str              # " Quenbar."

    @property
    def text(self) -> str:
        return "\n" + self.prompt + self.answer + "\n"


def make_facts(n: int, seed: int = SEED) -> list[Fact]:
    """``n`` synthetic facts with unique invented subjects and random invented objects."""
    rng = random.Random(seed + 1)

    def name() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    subjects: set[str] = set()
    facts = []
    while len(facts) < n:
        s = name()
        if s in subjects:
            continue
        subjects.add(s)
        facts.append(Fact(rng.choice(RELATIONS).format(s=s), " " + name() + "."))
    return facts


def fact_tensors(facts: list[Fact]) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ids, next-token targets (-100 on padding) and a mask of the answer's target positions."""
    seqs = [encode(f.text) for f in facts]
    width = max(map(len, seqs))
    ids = torch.zeros(len(facts), width, dtype=torch.long)
    targets = torch.full((len(facts), width - 1), -100, dtype=torch.long)
    answer = torch.zeros(len(facts), width - 1, dtype=torch.bool)
    for i, (f, s) in enumerate(zip(facts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        targets[i, :len(s) - 1] = torch.tensor(s[1:])
        start = len(encode("\n" + f.prompt))          # first answer byte, as a position in s
        answer[i, start - 1:start - 1 + len(encode(f.answer))] = True
    return ids, targets, answer


# ----------------------------------------------------------------------------- metrics
def recall_from_logits(logits: Tensor, targets: Tensor, answer: Tensor) -> Tensor:
    """Per fact: 1.0 if the argmax at every answer position equals the answer byte, else 0.0.

    ``logits`` (N, T, V) are the teacher-forced next-token logits, ``targets`` (N, T) the next
    tokens and ``answer`` (N, T) marks the answer's positions. With greedy decoding, the model
    emits the answer after the prompt exactly when this holds, so this is greedy-decoding recall.
    """
    hit = (logits.argmax(-1) == targets) | ~answer
    return hit.all(dim=1).float()


@torch.no_grad()
def fact_recall(model: nn.Module, facts: list[Fact]) -> float:
    ids, targets, answer = fact_tensors(facts)
    logits = model(input_ids=ids[:, :-1]).logits
    return recall_from_logits(logits, targets, answer).mean().item()


@torch.no_grad()
def greedy_answer(model: nn.Module, prompt: str, n: int) -> str:
    """Greedy decoding of ``n`` bytes after ``prompt`` (used to cross-check the recall metric)."""
    ids = torch.tensor([encode("\n" + prompt)])
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return decode(ids[0, -n:].tolist())


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: Tensor, batch: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows``."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(input_ids=w[:, :-1]).logits
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count


# ----------------------------------------------------------------------------- model & training
def make_model(seed: int = SEED, n_layer: int = N_LAYER, n_embd: int = N_EMBD, n_head: int = N_HEAD,
               ctx: int = CTX) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=10, eos_token_id=10)
    return GPT2LMHeadModel(cfg)


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def pretrain(model: nn.Module, stream: Tensor, steps: int, batch: int, lr: float, ctx: int,
             seed: int, progress: bool = True) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random windows of the training text."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, leave=False)
    for _ in bar:
        loss = lm_loss(model, random_batch(stream, batch, ctx, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def make_optimizer(model: nn.Module, spec: dict[str, Any], observe_stream: Tensor, cfg: Config
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model to fine-tune (LoRA wraps it) and its optimizer; MaskedAdamW is calibrated here."""
    kind = spec["kind"]
    if kind == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, bias="none",
                          target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    if kind == "masked":
        options = {k: v for k, v in spec.items() if k not in ("kind", "lr")}
        options.setdefault("weight_decay", 0.0)
        opt = MaskedAdamW(model.parameters(), lr=spec["lr"], **options)
        # select / protect / restore: importance of the first domain -> anchor
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        model.train()
        for _ in range(cfg.observe_batches):
            opt.zero_grad(set_to_none=True)
            lm_loss(model, random_batch(observe_stream, cfg.pretrain_batch, cfg.ctx, gen)).backward()
            opt.observe()
        opt.zero_grad(set_to_none=True)
        opt.consolidate()
        return model, opt
    raise ValueError(f"unknown method kind {kind!r}")


def finetune(model: nn.Module, opt: torch.optim.Optimizer, facts: list[Fact], steps: int, batch: int,
             seed: int, progress: bool = True, desc: str = "finetune") -> list[float]:
    """``steps`` steps on random mini-batches of fact sentences (loss on every byte of the sentence)."""
    from tqdm import tqdm

    ids, targets, _ = fact_tensors(facts)
    gen = torch.Generator().manual_seed(seed + 3)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, len(facts), (batch,), generator=gen)
        logits = model(input_ids=ids[idx, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets[idx].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------- experiment
@dataclass
class Config:
    seed: int = SEED
    ctx: int = CTX
    n_layer: int = N_LAYER
    n_embd: int = N_EMBD
    n_head: int = N_HEAD
    pretrain_steps: int = PRETRAIN_STEPS
    pretrain_batch: int = PRETRAIN_BATCH
    pretrain_lr: float = PRETRAIN_LR
    n_facts: int = N_FACTS
    ft_steps: int = FT_STEPS
    ft_batch: int = FT_BATCH
    observe_batches: int = OBSERVE_BATCHES
    eval_windows: int = EVAL_WINDOWS
    eval_split: str = "test"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def run(cfg: Config, progress: bool = True, pretrained: str | None = None) -> dict[str, Any]:
    """Pretrain once (or load ``pretrained``), then fine-tune a copy per method; returns the results dict."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = pydoc_splits(cfg.seed)
    facts = make_facts(cfg.n_facts, cfg.seed)
    windows = eval_windows(data[cfg.eval_split], cfg.ctx, cfg.eval_windows)
    positions = max(cfg.ctx, fact_tensors(facts)[0].shape[1])     # room for the longest fact too
    base = make_model(cfg.seed, cfg.n_layer, cfg.n_embd, cfg.n_head, positions)
    cache = Path(pretrained) if pretrained else None
    if cache is not None and cache.exists():
        base.load_state_dict(torch.load(cache, weights_only=True))
        pre_losses: list[float] = []
    else:
        pre_losses = pretrain(base, data["train"], cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr,
                              cfg.ctx, cfg.seed, progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(base.state_dict(), cache)
    base.eval()
    before = heldout_loss(base, windows)
    recall_before = fact_recall(base, facts)
    t_pre = time.time() - t0

    out: dict[str, Any] = {"config": asdict(cfg), "heldout_split": cfg.eval_split,
                           "heldout_loss_before": before, "recall_before": recall_before,
                           "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
                           "pretrain_seconds": t_pre, "methods": {}}
    for name in cfg.methods:
        spec = {**METHODS[name], **cfg.overrides.get(name, {})}
        t1 = time.time()
        model, opt = make_optimizer(copy.deepcopy(base), spec, data["train"], cfg)
        losses = finetune(model, opt, facts, cfg.ft_steps, cfg.ft_batch, cfg.seed, progress, desc=name)
        after = heldout_loss(model, windows)
        recall = fact_recall(model, facts)
        out["methods"][name] = {
            "spec": spec, "heldout_loss_after": after,
            "relative_forgetting": (after - before) / before,
            "recall": recall, "final_fact_loss": losses[-1], "fact_losses": losses,
            "seconds": time.time() - t1,
        }
    ref = out["methods"].get("adamw")
    for r in out["methods"].values():
        if ref is not None:
            rf = ref["relative_forgetting"]
            r["forgetting_vs_adamw"] = r["relative_forgetting"] / rf if rf > 0 else float("nan")
            r["learning_vs_adamw"] = r["recall"] / ref["recall"] if ref["recall"] > 0 else float("nan")
    out["total_seconds"] = time.time() - t0
    return out


def results_table(res: dict[str, Any]) -> str:
    """Markdown table of the per-method results."""
    lines = [(f"held-out split: {res['heldout_split']}; loss before fine-tuning {res['heldout_loss_before']:.4f}, "
              f"recall before {res['recall_before']:.3f}"), "",
             "| method | held-out loss before | after | relative forgetting | vs AdamW | fact recall | recall vs AdamW |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        lines.append(f"| {name} | {res['heldout_loss_before']:.4f} | {r['heldout_loss_after']:.4f} | "
                     f"{100 * r['relative_forgetting']:.1f}% | {r.get('forgetting_vs_adamw', float('nan')):.2f} | "
                     f"{r['recall']:.3f} | {r.get('learning_vs_adamw', float('nan')):.2f} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["methods"])
    forg = [100 * res["methods"][n]["relative_forgetting"] for n in names]
    rec = [100 * res["methods"][n]["recall"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, forg, color="tab:red")
    axes[0].set_ylabel("relative forgetting (% held-out loss increase)")
    axes[1].bar(names, rec, color="tab:blue")
    axes[1].set_ylabel("fact recall (%)")
    axes[1].set_ylim(0, 105)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"LM retention: pydoc pretraining -> {res['config']['n_facts']} synthetic facts "
                 f"({res['heldout_split']} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_override(items: list[str]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` strings -> {method: {key: value}} (value parsed as JSON when possible)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs, value = item.split("=", 1)
        method, key = lhs.split(".", 1)
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--out", default=OUT)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--eval-split", choices=["val", "test"], default=d.eval_split,
                   help="held-out documents: 'val' for tuning, 'test' for the reported table")
    for name in ("ctx", "n_layer", "n_embd", "n_head", "pretrain_steps", "pretrain_batch", "n_facts",
                 "ft_steps", "ft_batch", "observe_batches", "eval_windows"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a method setting, e.g. --set masked-anchor.anchor_decay=10")
    p.add_argument("--pretrained", default=None, help="cache file for the pretrained weights (load if present)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    cfg = Config(seed=a.seed, ctx=a.ctx, n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head,
                 pretrain_steps=a.pretrain_steps, pretrain_batch=a.pretrain_batch, pretrain_lr=a.pretrain_lr,
                 n_facts=a.n_facts, ft_steps=a.ft_steps, ft_batch=a.ft_batch, observe_batches=a.observe_batches,
                 eval_windows=a.eval_windows, eval_split=a.eval_split, methods=methods,
                 overrides=parse_override(a.set))
    res = run(cfg, progress=not a.no_progress, pretrained=a.pretrained)
    res["command"] = "python -m masked_optim.demo.lm_retention " + " ".join(argv if argv is not None else sys.argv[1:])
    res["platform"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = results_table(res)
    (out / "results.md").write_text(table + "\n")
    plot(res, out / "lm_retention.png")
    print(table)
    print(f"total {res['total_seconds']:.0f} s (pretraining {res['pretrain_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
