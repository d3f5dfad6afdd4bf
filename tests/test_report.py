"""lrc_src.report's budget-sweep helpers against hand-computed values."""

import json

import pandas as pd
import pytest

from lrc_src import report


def _sweep():
    rows = []
    vals = {("small", 100): [3.0, 3.2], ("pkd", 100): [3.5, 3.6], ("small", 200): [2.5, 2.9], ("pkd", 200): [2.6, 2.7]}
    for (m, t), vs in vals.items():
        for seed, v in enumerate(vs):
            rows.append({"method": m, "seed": seed, "tokens": t, "metric": "heldout_loss", "value": v})
    rows.append({"method": "small", "seed": 0, "tokens": 200, "metric": "tiny_continuation/acc_norm", "value": 0.5})
    return pd.DataFrame(rows)


def test_sweep_summary_and_margins():
    s = report.sweep_summary(_sweep()).set_index(["method", "tokens"])
    assert s.loc[("small", 200), "spread"] == pytest.approx(0.4)
    assert s.loc[("pkd", 100), "mean"] == pytest.approx(3.55) and s.loc[("pkd", 100), "n"] == 2
    m = report.sweep_margins(_sweep(), "small", ["pkd"]).set_index("tokens")
    # 100 tokens: pkd best 3.5 - small worst 3.2 = 0.3 (small wins on every pairing)
    assert m.loc[100, "margin_worst_case"] == pytest.approx(0.3)
    assert m.loc[100, "mean_difference"] == pytest.approx(3.55 - 3.1)
    assert m.loc[100, "seed_spread"] == pytest.approx(0.2)
    # 200 tokens: pkd best 2.6 - small worst 2.9 = -0.3 (not a win)
    assert m.loc[200, "margin_worst_case"] == pytest.approx(-0.3)


def test_budget_sweep_frame_reads_runs_and_evals(tmp_path):
    runs = {}
    for name, loss in (("a", 4.0), ("b", 3.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"status": "complete", "trainable_parameters": 10}))
        pd.DataFrame(
            {
                "step": [1, 2],
                "tokens": [8, 16],
                "lm": [5.0, 4.5],
                "tokens_per_s": [1.0, 1.0],
                "heldout_loss": [float("nan"), loss],
            }
        ).to_csv(d / "metrics.csv", index=False)
        runs[name] = {"dir": d, "method": "m", "seed": 0 if name == "a" else 1, "tokens": 16}
    ev = tmp_path / "b.csv"
    pd.DataFrame(
        [
            {"task": "tiny_continuation", "metric": "acc_norm", "value": 0.7},
            {"task": "tiny_continuation", "metric": "acc", "value": 0.6},
        ]
    ).to_csv(ev, index=False)
    df = report.budget_sweep_frame(runs, {"b": ev})
    assert list(df.columns) == ["method", "seed", "tokens", "metric", "value"]
    held = df[df.metric == "heldout_loss"].set_index("seed")["value"]
    assert held[0] == 4.0 and held[1] == 3.0
    assert df[df.metric == "tiny_continuation/acc_norm"].value.tolist() == [0.7]  # headline metrics only
    assert len(df) == 3


def test_incomplete_run_and_foreign_csv_name_the_file(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(ValueError, match=r"run\.json: the run is not complete \(status 'running'\)"):
        report.read_run(tmp_path)
    pd.DataFrame({"task": ["t"], "score": [1.0]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match=r"e\.csv is not an `lrc eval` CSV: it has no column metric, value"):
        report.read_evals({"m": tmp_path / "e.csv"})


def test_write_csv_bytes_and_atomic(tmp_path, monkeypatch):
    """report.write_csv writes what pandas writes (no index, "\\n" line ends), leaving no temp file."""
    import os

    df = pd.DataFrame({"a": [1.5, float("nan"), 1e-20], "b": ["x,y", 'q"u', "é"], "c": [1, 2, 3]})
    out = report.write_csv(df, tmp_path / "sub" / "t.csv")
    assert out.read_bytes() == df.to_csv(index=False).encode("utf-8")
    assert out.read_bytes().count(b"\n") == 4 and b"\r" not in out.read_bytes()

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        report.write_csv(df.head(1), out)
    assert out.read_bytes() == df.to_csv(index=False).encode("utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["t.csv"]
