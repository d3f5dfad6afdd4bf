"""Experiment trackers through accelerate: the scalars of metrics.csv, also where a tracker shows them.

`train.log_with` names none, one or several of TensorBoard, Trackio and Weights & Biases. They are
offline by default and keep their files inside the run folder (`<run>/trackers/`), so a run stays
one self-contained folder: TensorBoard event files, Trackio's local database, W&B's offline run
(`wandb sync <run>/trackers/wandb/...` uploads it later). A resumed run continues the same tracker
run: W&B and Trackio by a run id derived from the folder, TensorBoard by purging the events that
the resumed steps will write again (as metrics.csv drops its rows after the checkpoint).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TRACKERS = ("tensorboard", "trackio", "wandb")
EXTRA = "pip install 'lrc_src[trackers]'"
TRACKERS_DIR = "trackers"


def parse_log_with(value: str | Sequence[str] | None) -> list[str]:
    """Tracker names of `train.log_with` ('none', a name, or a list of names), checked: an unknown
    name or a tracker whose package is missing is a ValueError naming it."""
    names = [value] if isinstance(value, str) or value is None else list(value)
    names = [n for n in names if n not in (None, "none")]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"train.log_with: unknown tracker {name!r}; choose from none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(
                f"train.log_with: tracker {name!r} needs the package {name!r}, which is not installed: {EXTRA}"
            )
    return list(dict.fromkeys(names))


def flat_hyperparameters(config: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The run config as flat `section.key` hyperparameters of the types every tracker accepts."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hyperparameters(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists, tuples: as text
            flat[name] = str(value)
    return flat


def _run_id(run_dir: Path) -> str:
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def accelerator_arguments(names: list[str], run_dir: str | Path) -> dict:
    """`Accelerator(**...)` arguments: the trackers and their folder inside the run."""
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(Path(run_dir) / TRACKERS_DIR)}


def start(accelerator, names: list[str], run_dir: str | Path, config: Mapping, resume_step: int) -> None:
    """Open the trackers (offline, inside the run folder) and record the config as hyperparameters."""
    if not names:
        return
    run_dir = Path(run_dir)
    store = run_dir / TRACKERS_DIR
    store.mkdir(parents=True, exist_ok=True)
    init_kwargs: dict[str, dict] = {}
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(store))
        init_kwargs["wandb"] = {"id": _run_id(run_dir), "resume": "allow", "name": run_dir.name}
    if "trackio" in names:
        # trackio reads its store's location once, when it is first imported
        if "trackio" not in sys.modules:
            os.environ.setdefault("TRACKIO_DIR", str(store / "trackio"))
        init_kwargs["trackio"] = {"name": run_dir.name, "resume": "allow"}
    if "tensorboard" in names and resume_step > 0:
        init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    accelerator.init_trackers(run_dir.name, config=flat_hyperparameters(config), init_kwargs=init_kwargs)


def log_row(accelerator, row: Mapping, step: int) -> None:
    """Log one metrics.csv row's numbers (empty cells, e.g. no held-out loss this step, are skipped)."""
    values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
    accelerator.log(values, step=step)
