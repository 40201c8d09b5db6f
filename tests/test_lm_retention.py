"""Smoke test of the language-model retention demo (tiny sizes, < 20 s on 2 cores)."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from masked_optim.demo import lm_retention as lm


def test_recall_metric_hand_made_case():
    facts = [lm.Fact("The capital of Ab is", " Cd."), lm.Fact("The river of Ef is", " Gh.")]
    _, targets, answer = lm.fact_tensors(facts)
    # answer mask covers exactly the answer bytes
    for i, f in enumerate(facts):
        assert lm.decode(targets[i][answer[i]].tolist()) == f.answer
    # perfect logits: every target is the argmax -> recall 1 for both facts
    logits = torch.zeros(*targets.shape, 256)
    logits.scatter_(2, targets.clamp(min=0).unsqueeze(-1), 1.0)
    assert lm.recall_from_logits(logits, targets, answer).tolist() == [1.0, 1.0]
    # one wrong byte inside fact 0's answer -> fact 0 missed, fact 1 still recalled
    pos = answer[0].nonzero()[1].item()
    logits[0, pos] = 0.0
    logits[0, pos, (targets[0, pos] + 1) % 256] = 1.0
    assert lm.recall_from_logits(logits, targets, answer).tolist() == [0.0, 1.0]
    # a wrong byte in the prompt (outside the answer) does not count
    logits[1, 0] = 0.0
    logits[1, 0, (targets[1, 0] + 1) % 256] = 1.0
    assert lm.recall_from_logits(logits, targets, answer).tolist() == [0.0, 1.0]


def test_recall_matches_greedy_decoding():
    torch.manual_seed(0)
    model = lm.make_model(n_layer=1, n_embd=32, n_head=2, ctx=64).eval()
    facts = lm.make_facts(4)
    ids, targets, answer = lm.fact_tensors(facts)
    with torch.no_grad():
        per_fact = lm.recall_from_logits(model(input_ids=ids[:, :-1]).logits, targets, answer)
    for f, r in zip(facts, per_fact.tolist()):
        greedy = lm.greedy_answer(model, f.prompt, len(lm.encode(f.answer)))
        assert (greedy == f.answer) == bool(r)


def test_pipeline_writes_json(tmp_path):
    res = lm.main(["--out", str(tmp_path), "--methods", "adamw,masked-anchor", "--n-layer", "1",
                   "--n-embd", "32", "--n-head", "2", "--ctx", "32", "--pretrain-steps", "5",
                   "--pretrain-batch", "4", "--n-facts", "4", "--ft-steps", "3", "--ft-batch", "4",
                   "--observe-batches", "2", "--eval-windows", "4", "--eval-split", "val", "--no-progress"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "lm_retention.png").stat().st_size > 0
    assert set(data["methods"]) == {"adamw", "masked-anchor"}
    for r in data["methods"].values():
        for key in ("heldout_loss_after", "relative_forgetting", "recall", "forgetting_vs_adamw"):
            assert key in r
        assert 0.0 <= r["recall"] <= 1.0
        assert r["relative_forgetting"] == pytest.approx(
            (r["heldout_loss_after"] - data["heldout_loss_before"]) / data["heldout_loss_before"])
    assert res["heldout_split"] == "val"


def test_seed_summary_ratios_are_per_run():
    """lm_summary divides each run's figures by AdamW's in the same run, then averages."""
    from masked_optim.demo.lm_summary import summarise, table

    def run(seed, adamw, other):
        return {"config": {"seed": seed}, "methods": {
            "adamw": {"relative_forgetting": adamw[0], "recall": adamw[1]},
            "masked": {"relative_forgetting": other[0], "recall": other[1]},
        }}

    summary = summarise([run(0, (1.0, 1.0), (0.5, 0.9)), run(1, (2.0, 0.5), (0.5, 0.5))])
    masked = summary["methods"]["masked"]
    assert summary["seeds"] == [0, 1]
    assert masked["forgetting_vs_adamw"] == [0.5, 0.25] and masked["recall_vs_adamw"] == [0.9, 1.0]
    assert "| masked | 50.0% ± 0.0 | 0.38 (0.25–0.50) | 0.700 ± 0.283 | 0.95 |" in table(summary)
    # AdamW recalling nothing (toy sizes): the ratio is NaN, not a ZeroDivisionError
    zero = summarise([run(2, (1.0, 0.0), (0.5, 0.2))])["methods"]["masked"]
    assert zero["forgetting_vs_adamw"] == [0.5] and math.isnan(zero["recall_vs_adamw"][0])
