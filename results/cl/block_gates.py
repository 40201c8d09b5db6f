"""Digits validation: element gates against block gates (gate_block=16) for the methods with a mask.

    python results/cl/block_gates.py            # ~5 min on 2 cores; writes results/cl/block_gates.json

Seeds 100-101 (the tuning seeds), validation split, 10 epochs per task, each method's recorded
settings; only ``gate_block`` differs between the two rows of a pair.
"""
import json
from pathlib import Path

from masked_optim.demo.harness import run_many
from masked_optim.demo.methods import METHODS
from masked_optim.demo.metrics import summarise


def main() -> None:
    methods = []
    for name in ("masked-select", "masked-protect", "masked-protect-anchor+eps"):
        methods += [METHODS[name], METHODS[name].with_options(gate_block=16, name=f"{name} gate_block=16")]
    results = run_many(methods, [100, 101], 10, split="val", workers=2)
    summary = {name: {k: float(v[0]) for k, v in summarise(runs).items()} for name, runs in results.items()}
    Path(__file__).with_name("block_gates.json").write_text(json.dumps(summary, indent=1))
    for name, row in summary.items():
        print(f"{name:40s} val ACC {row['acc']:.3f}  NEW {row['new']:.3f}")


if __name__ == "__main__":
    main()
