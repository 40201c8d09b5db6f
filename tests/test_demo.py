"""The continual-learning demo: metrics on hand-made accuracy matrices, and a tiny end-to-end run."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from masked_optim.demo.__main__ import main  # noqa: E402
from masked_optim.demo.metrics import cl_metrics, summarise  # noqa: E402


def test_metrics_on_a_hand_made_matrix():
    R = np.array([[0.9, 0.1, 0.1],
                  [0.6, 0.8, 0.1],
                  [0.3, 0.7, 1.0]])
    m = cl_metrics(R)
    assert m["acc"] == pytest.approx((0.3 + 0.7 + 1.0) / 3)
    assert m["new"] == pytest.approx((0.9 + 0.8 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    # task 0 improves after task 1 (backward transfer), then drops: max-minus-last sees 0.9
    R = np.array([[0.5, 0.0, 0.0],
                  [0.9, 0.8, 0.0],
                  [0.4, 0.8, 0.9]])
    m = cl_metrics(R)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.4) + 0.0) / 2)
    assert m["bwt"] == pytest.approx(((0.4 - 0.5) + 0.0) / 2)


def test_no_forgetting_and_summary_over_seeds():
    perfect = np.ones((4, 4))
    assert cl_metrics(perfect) == dict(acc=1.0, bwt=0.0, forgetting=0.0, new=1.0)
    s = summarise([perfect, 0.5 * perfect])
    assert s["acc"] == pytest.approx((0.75, 0.25))
    with pytest.raises(ValueError, match="square"):
        cl_metrics(np.ones((2, 3)))


def test_demo_end_to_end_writes_table_json_and_png(tmp_path, capsys):
    rc = main(["--seeds", "1", "--epochs", "1", "--tasks", "2", "--workers", "1",
               "--methods", "adamw,ewc-adamw,masked-anchor", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| masked-anchor |" in out and "| ACC |" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["summary"]) == {"adamw", "ewc-adamw", "masked-anchor"}
    for name, runs in data["runs"].items():
        R = np.array(runs[0]["R"])
        assert R.shape == (2, 2) and ((R >= 0) & (R <= 1)).all()
        assert runs[0]["acc"] == pytest.approx(cl_metrics(R)["acc"])
        assert R[0, 0] > 0.5, f"{name} did not learn task 0 in one epoch"
    png = (tmp_path / "cl_digits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "results.md").read_text().count("\n|") >= 4


def test_unknown_method_is_refused(tmp_path, capsys):
    assert main(["--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_tune_only_writes_the_sweep_and_runs_no_test_split(tmp_path, capsys, monkeypatch):
    from masked_optim.demo import tuning

    monkeypatch.setitem(tuning.GRIDS, "masked-anchor", [dict(anchor_decay=3.0), dict(anchor_decay=30.0)])
    monkeypatch.setattr(tuning.tune, "__defaults__", ([100], None))  # one validation seed
    rc = main(["--tune-only", "--epochs", "1", "--workers", "1", "--methods", "masked-anchor", "--out", str(tmp_path)])
    assert rc == 0
    sweep = json.loads((tmp_path / "tuning.json").read_text())
    assert [r["method"] for r in sweep["rows"]] == ["adamw", "masked-anchor", "masked-anchor"]
    assert sweep["chosen"]["masked-anchor"] in ({"anchor_decay": 3.0}, {"anchor_decay": 30.0})
    assert not (tmp_path / "results.json").exists()
    assert "tuning.md" in capsys.readouterr().out


def test_full_runs_the_published_methods_only():
    from masked_optim.demo.methods import FULL_METHODS, METHODS

    assert "masked-protect-anchor+eps" in METHODS and "masked-protect-anchor+eps" not in FULL_METHODS
    assert {"adamw", "ewc-adamw", "masked-anchor+eps"} <= set(FULL_METHODS)


@pytest.mark.parametrize("flag,value", [("--seeds", "0"), ("--workers", "0"), ("--tasks", "0"), ("--epochs", "-1")])
def test_counts_below_their_least_are_refused(flag, value, capsys):
    """``--seeds 0`` used to run the default 3 seeds (0 read as "not given")."""
    with pytest.raises(SystemExit):
        main([flag, value])
    assert f"argument {flag}: must be at least" in capsys.readouterr().err
