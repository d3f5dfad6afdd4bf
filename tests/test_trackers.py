"""Experiment trackers: train.log_with is checked up front; the run config becomes flat hyperparameters."""

import pytest
from conftest import read_metrics

from lrc_src import trackers


def test_parse_log_with():
    assert trackers.parse_log_with("none") == []
    assert trackers.parse_log_with(None) == []
    assert trackers.parse_log_with([]) == []
    assert trackers.parse_log_with("tensorboard") == ["tensorboard"]
    assert trackers.parse_log_with(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        trackers.parse_log_with(["tensorboard", "mlflow"])


def test_missing_tracker_package_names_the_extra(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ValueError, match=r"'wandb'.*not installed: pip install 'lrc_src\[trackers\]'"):
        trackers.parse_log_with("wandb")


def test_flat_hyperparameters():
    flat = trackers.flat_hyperparameters(
        {"method": "lrc", "train": {"lr": 1e-3, "betas": (0.9, 0.999), "max_steps": None}, "x": {"y": {"z": 1}}}
    )
    assert flat == {
        "method": "lrc",
        "train.lr": 1e-3,
        "train.betas": "(0.9, 0.999)",
        "train.max_steps": "None",
        "x.y.z": 1,
    }


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_what_metrics_csv_holds_and_resume_continues_it(tmp_path, monkeypatch):
    """The event files carry every number of metrics.csv at the same steps; a run stopped after its
    step-2 checkpoint and resumed logs steps 3-4 once (not twice), as metrics.csv does."""
    from pathlib import Path

    import lrc_src.train as trainer
    from lrc_src.config import load_config

    ci = Path(__file__).resolve().parents[1] / "config" / "ci.yaml"
    cfg = load_config(
        ci, ["train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.log_with=tensorboard"]
    )
    real, calls = trainer.train_step, []

    def stop_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, tmp_path / "r", progress=False)
    monkeypatch.setattr(trainer, "train_step", real)
    run = trainer.train(cfg, tmp_path / "r", progress=False)

    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    scalars = _scalars(run / "trackers" / "r")
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                assert scalars[key][int(row["step"])] == pytest.approx(float(value), rel=1e-6), (key, row["step"])
    assert sorted(scalars["loss"]) == [1, 2, 3, 4] and sorted(scalars["heldout_loss"]) == [2, 4]


def test_unknown_tracker_is_one_line(tmp_path, capsys):
    from pathlib import Path

    from lrc_src.cli import main

    ci = Path(__file__).resolve().parents[1] / "config" / "ci.yaml"
    code = main(
        [
            "train",
            "--config",
            str(ci),
            "--set",
            "train.log_with=[tensorboard, nope]",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "unknown tracker 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
