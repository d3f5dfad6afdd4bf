"""The run folder's checkpoint/: the trainable state, optimizer, scheduler, RNG and step of a run.

    checkpoint/
        trainable.safetensors   the method's trainable parameters (the names of trainable_named_parameters)
        optimizer.safetensors   the optimizer's per-parameter tensors as "state.<index>.<name>"
                                (AdamW: step, exp_avg, exp_avg_sq)
        state.json              written last, so its presence marks the folder complete: the step, the
                                size and sha256 of the files above, the optimizer's param groups, the
                                scheduler's state and the RNG states (torch, CUDA, numpy, python)

No file is unpickled: a run folder from elsewhere (a shared drive, a downloaded artifact) can hold
wrong numbers, never code. A checkpoint in the pickled format (optimizer.pt, scheduler.pt,
rng.pt) is refused with a message saying how to go on.

A save writes checkpoint.tmp/, renames checkpoint/ -> checkpoint.old/ and checkpoint.tmp/ ->
checkpoint/, then removes checkpoint.old/; at every moment one of checkpoint/ and checkpoint.old/
is complete, and `find_checkpoint` picks it. A damaged file (truncated, overwritten) is found by
its sha256 before anything is loaded, and named in a one-line ValueError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrc_src.fileio import atomic_write_text, sha256_file

FORMAT = 2  # state.json's "format"; the pickled format's state.json has none
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")


def _fsync(path: Path) -> None:
    """Flush a file's or folder's entry to disk: a rename after it cannot land before the data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # folders cannot be opened on some systems (Windows)
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- plain state <-> JSON / tensors


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors keyed "state.<index>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict, optimizer) -> dict:
    """The inverse of `_split_optimizer_state`; tuples (betas) come back as tuples where the live
    optimizer's groups hold tuples, so the loaded groups equal the saved ones in type too."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, per_param in saved["state"].items():
        state.setdefault(int(index), {}).update(per_param)
    live = optimizer.param_groups
    groups = [
        {k: tuple(v) if i < len(live) and isinstance(live[i].get(k), tuple) else v for k, v in group.items()}
        for i, group in enumerate(saved["param_groups"])
    ]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _rng_state() -> dict:
    """Every RNG the loop draws from, as JSON (byte states as lists of ints)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    rng = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    name, key, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------- save


def save_checkpoint(
    path: Path, method, optimizer, scheduler, step: int, processes: int = 1, inputs: dict | None = None
) -> None:
    """Replace path/ with the state after `step` optimizer steps of a run of `processes` data-parallel
    processes, trained on `inputs` (`assets.Inputs.identity`, compared by `changed_inputs`); a crash at
    any point leaves the previous checkpoint (or the new one) complete, see `find_checkpoint`."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
    trainable = {n: p.detach().cpu().contiguous() for n, p in method.trainable_named_parameters()}
    files = {}
    for name, tensors in ((TRAINABLE, trainable), (OPTIMIZER, optimizer_tensors)):
        save_file(tensors, tmp / name)
        _fsync(tmp / name)
        files[name] = _file_record(tmp / name)
    state = {
        "format": FORMAT,
        "step": step,
        "processes": processes,
        "inputs": inputs or {},
        "files": files,
        "optimizer": optimizer_rest,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    atomic_write_text(tmp / STATE, json.dumps(state))  # last: the folder is complete from here on
    _fsync(tmp)

    old = path.with_name(path.name + ".old")
    if (path / STATE).is_file():  # the previous checkpoint waits as .old until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    else:  # no previous checkpoint, or an incomplete one: .old (if any) stays the complete one
        shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


INPUT_CHANGES = {
    "teacher": "the teacher loaded now is not the one it was trained with (other weights under the same "
    "name, or a relative path read from another folder)",
    "data": "the training data tokenised now is not what it was trained on (an edited corpus, or a "
    "relative glob read from another folder)",
    "start": "the student it started from (baseline.init_from) holds other weights now (that run was trained again?)",
}


def changed_inputs(state: dict, identity: dict, what: tuple[str, ...]) -> str | None:
    """How the inputs named in `what` ("teacher", "data", "start") differ from those a checkpoint's
    state records (the first that does, described), or None: a run continues, and a clone is
    exported, only with what it was trained on. An input the checkpoint does not record passes."""
    recorded = state.get("inputs") or {}
    for key in what:
        if key in recorded and recorded[key] != identity.get(key):
            return INPUT_CHANGES[key]
    return None


def drop_optimizer_state(path: Path) -> None:
    """Remove a finished run's optimizer moments (2x the trainable state on disk): the checkpoint
    then serves export and analysis, and can no longer be resumed."""
    state = json.loads((path / STATE).read_text())
    if state["files"].pop(OPTIMIZER, None) is not None:
        atomic_write_text(path / STATE, json.dumps(state))  # first: never a listed file that is gone
    (path / OPTIMIZER).unlink(missing_ok=True)


def discard_stale_copies(path: Path) -> None:
    """Leave path/ as the run's one checkpoint, for a finished run: a path.old/ that a save cut off
    between its two renames left behind becomes path/ again if path/ is incomplete, else it goes;
    path.tmp/ goes."""
    old, tmp = path.with_name(path.name + ".old"), path.with_name(path.name + ".tmp")
    if not (path / STATE).is_file() and (old / STATE).is_file():
        shutil.rmtree(path, ignore_errors=True)
        old.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- find and load


def find_checkpoint(run_dir: Path) -> Path | None:
    """run_dir's newest complete checkpoint: checkpoint/, or checkpoint.old/ when a save was cut off
    between its two renames. An incomplete checkpoint/ with nothing to fall back on is returned too
    (loading it says what is missing); None when the run has no checkpoint."""
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name / STATE).is_file():
            return run_dir / name
    return run_dir / "checkpoint" if (run_dir / "checkpoint").is_dir() else None


def read_state(path: Path) -> dict:
    """path/state.json, checked: ValueError naming the file when it is missing, damaged or of an
    earlier (pickle) format."""
    file = path / STATE
    restart = f"delete {path} to start the run over"
    if not file.is_file():
        raise ValueError(f"{path} is an incomplete checkpoint (no {STATE}, the file written last); {restart}")
    try:
        state = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is damaged ({e}); {restart}") from None
    if not isinstance(state, dict) or "format" not in state:
        legacy = ", ".join(n for n in LEGACY_FILES if (path / n).exists()) or "pickle files"
        raise ValueError(
            f"{path} was written by an earlier version of lrc ({legacy}: pickles, never loaded "
            f"because they can run code); finish the run with that version, or {restart}"
        )
    if state["format"] != FORMAT:
        raise ValueError(f"{file}: checkpoint format {state['format']!r}, this version reads {FORMAT}")
    return state


def _load_tensors(path: Path, name: str, record: dict) -> dict[str, torch.Tensor]:
    """path/name after checking its size and sha256 against state.json's record of it."""
    file = path / name
    if not file.is_file():
        raise ValueError(f"{file} is missing; delete {path} to start the run over")
    if file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
        raise ValueError(
            f"{file} is damaged (size or sha256 differs from {STATE}'s); delete {path} to start the run over"
        )
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file} is not a safetensors file ({e})") from None


def load_checkpoint(path: Path, method, optimizer=None, scheduler=None) -> int:
    """Load path/ into method and, to resume, into optimizer, scheduler and the RNGs; returns the
    step. Without optimizer and scheduler only the trainable state is read: what a finished run
    needs (export, writing its record again), so its dropped optimizer state is not missed. Every
    file read is checked (size, sha256, format) before any state is set; a bad one is a ValueError
    naming it."""
    assert (optimizer is None) == (scheduler is None), "resuming needs both the optimizer and the scheduler"
    state = read_state(path)
    try:
        files, step = state["files"], int(state["step"])
        if optimizer is not None and OPTIMIZER not in files:
            raise ValueError(
                f"{path} holds no optimizer state (a finished run's, train.keep_optimizer_state="
                "false): it can be exported, not resumed"
            )
        trainable = _load_tensors(path, TRAINABLE, files[TRAINABLE])
        if optimizer is not None:
            optimizer_state = _join_optimizer_state(
                _load_tensors(path, OPTIMIZER, files[OPTIMIZER]), state["optimizer"], optimizer
            )
            scheduler_state, rng = state["scheduler"], state["rng"]
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path / STATE} lacks or garbles {e}; delete {path} to start the run over") from None

    params = dict(method.trainable_named_parameters())
    wrong = sorted(n for n, p in params.items() if n not in trainable or trainable[n].shape != p.shape)
    if wrong:
        raise ValueError(f"checkpoint {path} does not match this config (missing or other shape: {wrong[:3]}...)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trainable[n].to(p.device, p.dtype))
    if optimizer is None:
        return step
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        _set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path} does not match this config ({e})") from None
    return step
