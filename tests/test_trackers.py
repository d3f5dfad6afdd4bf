"""Experiment trackers: train.log_with is checked up front; the run config becomes flat hyperparameters."""
import pytest

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
    flat = trackers.flat_hyperparameters({"method": "lrc", "train": {"lr": 1e-3, "betas": (0.9, 0.999),
                                                                     "max_steps": None}, "x": {"y": {"z": 1}}})
    assert flat == {"method": "lrc", "train.lr": 1e-3, "train.betas": "(0.9, 0.999)", "train.max_steps": "None",
                    "x.y.z": 1}
