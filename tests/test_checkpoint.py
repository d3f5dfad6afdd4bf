"""Checkpoints: nothing in one is unpickled, a hostile or damaged one is refused in one line that
names the file, and no crash (a save cut off anywhere, kill -9 mid-run) loses the previous state or
changes the run's numbers."""

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_run, read_metrics

from lrc_src import checkpoint as ckpt_module
from lrc_src.checkpoint import drop_optimizer_state, find_checkpoint, load_checkpoint, save_checkpoint
from lrc_src.cli import main
from lrc_src.config import load_config
from lrc_src.fileio import sha256_file
from lrc_src.train import lr_lambda, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "config" / "ci.yaml"
SETS = ["train.max_steps=6", "train.save_every=2", "train.eval_every=3"]
ARGS = ["--config", str(CI), *[a for s in SETS for a in ("--set", s)], "--no-progress"]


# ---------------------------------------------------------------- helpers


class Tiny(torch.nn.Module):
    """A stand-in for a method: a matrix and a norm vector (the optimizer's two groups)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(5, 3, generator=g))
        self.norm = torch.nn.Parameter(torch.randn(3, generator=g))

    def trainable_named_parameters(self):
        return list(self.named_parameters())


def tiny_state(seed: int = 0):
    method = Tiny(seed)
    optimizer = make_optimizer(method.trainable_named_parameters(), load_config(CI).train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0.2))
    return method, optimizer, scheduler


def take_steps(method, optimizer, scheduler, n: int) -> None:
    """n steps whose loss draws from torch's RNG, so a wrongly restored RNG changes the weights."""
    for _ in range(n):
        loss = ((method.w @ method.norm - torch.randn(5)) ** 2).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.trainable_named_parameters()}


def loads_as(path: Path, expected: dict[str, torch.Tensor]) -> int:
    """Load path into a fresh tiny state; assert its weights are `expected`; the step."""
    method, optimizer, scheduler = tiny_state(seed=1)
    step = load_checkpoint(path, method, optimizer, scheduler)
    got = snapshot(method)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    return step


def saved_tiny_run(run: Path, steps: int = 2):
    """run/checkpoint/ after `steps` steps; the state, to go on from."""
    method, optimizer, scheduler = tiny_state()
    take_steps(method, optimizer, scheduler, steps)
    save_checkpoint(run / "checkpoint", method, optimizer, scheduler, steps)
    return method, optimizer, scheduler


def folder_listing(folder: Path) -> dict[str, str]:
    """{relative path: sha256 (or 'dir')} of everything under folder."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else sha256_file(p)) for p in sorted(folder.rglob("*"))}


class CreatesFile:
    """A pickle payload: unpickling it creates `target` (what a hostile checkpoint could run)."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def hostile_bytes(target: Path) -> bytes:
    data = pickle.dumps({"state": CreatesFile(target)})
    pickle.loads(data)["state"].close()  # the payload is live: unpickling creates the file
    assert target.is_file()
    target.unlink()
    return data


# ---------------------------------------------------------------- runs shared by the tests


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted ci run (6 steps, checkpoints at 2, 4, 6)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *ARGS, "--output-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """The same run stopped by a full disk while saving step 4: checkpoint/ holds step 2."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    real = ckpt_module.save_file

    def disk_full_at_step_4(tensors, path):
        previous = Path(path).parent.parent / "checkpoint" / "state.json"
        if previous.is_file() and json.loads(previous.read_text())["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt_module, "save_file", disk_full_at_step_4)
        with pytest.raises(OSError, match="No space left"):
            train(load_config(CI, SETS), run, progress=False)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (run / "run.json").exists() and (run / "checkpoint.tmp").is_dir()
    return run


# ---------------------------------------------------------------- no pickle, exact round trip


def test_round_trip_is_exact_and_unpickles_nothing(tmp_path, monkeypatch):
    """Weights, AdamW moments, the schedule and every RNG come back exactly: the steps after a
    load equal the steps after the save. Nothing is unpickled on the way, and the folder holds
    only safetensors and JSON."""
    method, optimizer, scheduler = saved_tiny_run(tmp_path, steps=3)
    draws = (random.random(), float(np.random.rand()))
    take_steps(method, optimizer, scheduler, 3)
    expected, lr = snapshot(method), scheduler.get_last_lr()

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)
    fresh, fresh_opt, fresh_sched = tiny_state(seed=1)
    assert load_checkpoint(tmp_path / "checkpoint", fresh, fresh_opt, fresh_sched) == 3
    assert (random.random(), float(np.random.rand())) == draws
    assert fresh_opt.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    assert type(fresh_opt.param_groups[0]["betas"]) is tuple
    take_steps(fresh, fresh_opt, fresh_sched, 3)
    got = snapshot(fresh)
    assert all(torch.equal(got[n], expected[n]) for n in expected) and fresh_sched.get_last_lr() == lr
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
    ]


def test_finished_checkpoint_without_optimizer_is_exportable_not_resumable(tmp_path):
    trained, _, _ = saved_tiny_run(tmp_path)
    drop_optimizer_state(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint" / "optimizer.safetensors").exists()
    assert (tmp_path / "checkpoint" / "trainable.safetensors").is_file()
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "checkpoint", *tiny_state())
    fresh = Tiny(seed=1)  # the trainable state alone: what export and a finished run's record need
    assert load_checkpoint(tmp_path / "checkpoint", fresh) == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


# ---------------------------------------------------------------- hostile and damaged checkpoints


def _legacy_pickles(ckpt: Path, target: Path) -> str:
    """The layout before safetensors-only checkpoints, with payloads in its pickles."""
    for name in ("optimizer.safetensors", "state.json"):
        (ckpt / name).unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (ckpt / name).write_bytes(hostile_bytes(target))
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))
    return "earlier version of lrc (optimizer.pt, scheduler.pt, rng.pt"


def _pickle_as_optimizer(ckpt: Path, target: Path) -> str:
    (ckpt / "optimizer.safetensors").write_bytes(hostile_bytes(target))
    return "optimizer.safetensors is damaged"


def _pickle_as_optimizer_listed(ckpt: Path, target: Path) -> str:
    """The pickle with state.json's record of it forged to match: still never unpickled."""
    _pickle_as_optimizer(ckpt, target)
    state = json.loads((ckpt / "state.json").read_text())
    file = ckpt / "optimizer.safetensors"
    state["files"]["optimizer.safetensors"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    (ckpt / "state.json").write_text(json.dumps(state))
    return "optimizer.safetensors is not a safetensors file"


def _pickle_as_state(ckpt: Path, target: Path) -> str:
    (ckpt / "state.json").write_bytes(hostile_bytes(target))
    return "state.json is damaged"


def _truncated_trainable(ckpt: Path, target: Path) -> str:
    data = (ckpt / "trainable.safetensors").read_bytes()
    (ckpt / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    return "trainable.safetensors is damaged"


def _flipped_byte_in_optimizer(ckpt: Path, target: Path) -> str:
    data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a moment's last byte: the file still parses, only its sha256 tells
    (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
    return "optimizer.safetensors is damaged"


def _truncated_state(ckpt: Path, target: Path) -> str:
    text = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(text[: len(text) // 2])
    return "state.json is damaged"


def _missing_optimizer(ckpt: Path, target: Path) -> str:
    (ckpt / "optimizer.safetensors").unlink()
    return "optimizer.safetensors is missing"


def _no_state(ckpt: Path, target: Path) -> str:
    (ckpt / "state.json").unlink()
    return "incomplete checkpoint (no state.json"


BAD_CHECKPOINTS = [
    _legacy_pickles,
    _pickle_as_optimizer,
    _pickle_as_optimizer_listed,
    _pickle_as_state,
    _truncated_trainable,
    _flipped_byte_in_optimizer,
    _truncated_state,
    _missing_optimizer,
    _no_state,
]


@pytest.mark.parametrize("spoil", BAD_CHECKPOINTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_is_refused_in_one_line(spoil, tmp_path):
    """Hostile pickles (old layout, or in place of the new files) and damaged files: a ValueError
    of one line naming the file; nothing is created, the folder is as it was."""
    run, target = tmp_path / "run", tmp_path / "pwned"
    saved_tiny_run(run)
    expected = spoil(run / "checkpoint", target)
    before = folder_listing(tmp_path)
    found = find_checkpoint(run)
    assert found == run / "checkpoint"
    with pytest.raises(ValueError) as e:
        load_checkpoint(found, *tiny_state())
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not target.exists() and folder_listing(tmp_path) == before


@pytest.mark.parametrize(
    "spoil",
    [_legacy_pickles, _pickle_as_optimizer_listed, _flipped_byte_in_optimizer],
    ids=lambda f: f.__name__.strip("_"),
)
def test_lrc_train_refuses_bad_checkpoint(spoil, interrupted, tmp_path, capsys):
    """`lrc train` on a run folder with a hostile or damaged checkpoint: `lrc: error: ...` naming
    the file, exit 2, no file created, the run folder unchanged."""
    run, target = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(interrupted, run)
    shutil.rmtree(run / "checkpoint.tmp")
    expected = spoil(run / "checkpoint", target)
    before = folder_listing(tmp_path)
    capsys.readouterr()
    assert main(["train", *ARGS, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrc: error: ") and expected in err and "\n" not in err, err
    assert not target.exists() and folder_listing(tmp_path) == before


# ---------------------------------------------------------------- faults lose nothing


def test_save_cut_off_anywhere_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """A save that stops at its k-th file operation (a half-written file and ENOSPC, or a crash
    before a rename or removal), for every k: the run folder still loads, as the previous step
    or the new one, never a mix; and the next save succeeds."""
    pristine = tmp_path / "pristine"
    method, optimizer, scheduler = saved_tiny_run(pristine, steps=2)
    previous = snapshot(method)
    take_steps(method, optimizer, scheduler, 1)
    new = snapshot(method)

    real_save, real_write, real_rename, real_rmtree = (
        ckpt_module.save_file,
        ckpt_module.atomic_write_text,
        Path.rename,
        shutil.rmtree,
    )
    calls = {"n": 0, "fail_at": 0}

    def fault(do, half_written: bool = False):
        def op(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] != calls["fail_at"]:
                return do(*args, **kwargs)
            if half_written:
                do(*args, **kwargs)
                file = Path(args[1])
                file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        return op

    monkeypatch.setattr(ckpt_module, "save_file", fault(real_save, half_written=True))
    monkeypatch.setattr(ckpt_module, "atomic_write_text", fault(real_write))
    monkeypatch.setattr(Path, "rename", fault(real_rename))
    monkeypatch.setattr(shutil, "rmtree", fault(real_rmtree))
    outcomes = []
    for k in range(1, 50):
        run = tmp_path / f"k{k}"
        real_rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        calls.update(n=0, fail_at=k)
        try:
            save_checkpoint(run / "checkpoint", method, optimizer, scheduler, 3)
        except OSError:
            pass
        else:
            break
        finally:
            calls["fail_at"] = 0
        found = find_checkpoint(run)
        step = loads_as(found, previous if json.loads((found / "state.json").read_text())["step"] == 2 else new)
        outcomes.append((found.name, step))
        save_checkpoint(run / "checkpoint", method, optimizer, scheduler, 3)  # the next save cleans up
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
        assert loads_as(find_checkpoint(run), new) == 3
    else:
        raise AssertionError("save_checkpoint never completed")
    assert loads_as(find_checkpoint(run), new) == 3
    # every stage was cut: the files, the marker, the swap's window (checkpoint.old/ only), the cleanup
    assert len(outcomes) >= 6, outcomes
    assert ("checkpoint.old", 2) in outcomes and ("checkpoint", 2) in outcomes and ("checkpoint", 3) in outcomes


def test_run_stopped_by_a_failed_save_resumes_exactly(interrupted, reference, tmp_path, capsys):
    """The run whose step-4 save hit a full disk: re-running the command resumes from step 2 (and
    says so) and ends with the uninterrupted run's metrics and student."""
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    rows_before = read_metrics(run)
    assert [r["step"] for r in rows_before] == ["1", "2", "3", "4"]
    assert main(["train", *ARGS, "--output-dir", str(run)]) == 0
    assert f"{run}: resuming from the checkpoint of step 2 of " in capsys.readouterr().err
    assert read_metrics(run)[:2] == rows_before[:2]  # kept, timings too: it resumed at step 2
    assert_same_run(reference, run, steps=6)
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["state.json", "trainable.safetensors"]
    assert not (run / "checkpoint.tmp").exists() and not (run / "checkpoint.old").exists()


def test_killed_lrc_train_resumes_from_its_checkpoint(reference, tmp_path):
    """kill -9 once the first checkpoint is on disk, re-run the same command: it starts from that
    checkpoint's step (the rows up to it are kept as written, timings included) and ends with the
    uninterrupted run's metrics and student (what a rerun of an incomplete workflow job does)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrc_src.cli", "train", *ARGS, "--output-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "run.json").exists(), "the run finished before it could be killed"
    resumed_at = json.loads(state.read_text())["step"]
    assert resumed_at < 6
    kept = [r for r in read_metrics(run) if int(r["step"]) <= resumed_at]
    assert len(kept) == resumed_at
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert read_metrics(run)[:resumed_at] == kept
    assert_same_run(reference, run, steps=6)
