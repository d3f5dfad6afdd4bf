"""One trainer for LRC and every baseline: `train(cfg, output_dir)`.

Reads top to bottom: setup (teacher, data, method; every user error is raised here, before the
run folder is touched), `accelerator.prepare`, resume from the last checkpoint, the loop, save.
The inputs come from lrc_src.assets, the method, its AdamW and schedule from lrc_src.factory, and
each optimizer step is lrc_src.step.train_step (the step benchmarks/throughput.py times).
`load_run` rebuilds a run folder's method from its last checkpoint; `export_run` (`lrc export`)
writes its student.

Run folder:
    config.yaml        the resolved config
    metrics.csv        one row per log_every steps: step, tokens, lr, loss, every loss term,
                       grad_norm, tokens_per_s, elapsed_s, heldout_loss (every eval_every steps and
                       at the end)
    checkpoint/        trainable state (safetensors), optimizer, scheduler, RNG, step
    exports/step_N/    students exported at train.export_at steps, plus projections.safetensors
                       (the trainable state at that step, as in checkpoint/)
    student/           the final student as a plain HF folder with tokenizer, and its model card
                       README.md (lrc_src.card; `lrc eval` adds its scores)
    trackers/          TensorBoard / Trackio / W&B files when train.log_with names trackers
    run.json           written last: {"status": "complete", ..., the software versions and device,
                       the sha256 of the trainable state and of metrics.csv}; its absence means
                       incomplete

Re-running the same command on the same folder resumes from checkpoint/ (metrics rows after the
checkpoint are dropped and recomputed), so a killed run continues exactly as if uninterrupted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lrc_src import trackers
from lrc_src.analysis import heldout_loss
from lrc_src.assets import load_inputs, load_models
from lrc_src.card import write_model_card
from lrc_src.checkpoint import (
    TRAINABLE,
    changed_inputs,
    discard_stale_copies,
    drop_optimizer_state,
    find_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from lrc_src.config import ExperimentConfig, dump_config, load_config, same_experiment
from lrc_src.factory import build_method, lr_lambda, make_optimizer
from lrc_src.fileio import atomic_write_text, check_output_folder, locked, refuse_if_locked, sha256_file
from lrc_src.runtime import (
    keep_freed_memory,
    make_accelerator,
    resolve_compile,
    resolve_mixed_precision,
    set_threads,
    software,
)
from lrc_src.step import DDP_TYPES, NonFiniteLossError, accumulation_window, train_step
from lrc_src.teachers import fingerprint

TIMING_COLUMNS = ("tokens_per_s", "elapsed_s")  # the only columns that differ between reruns
LOCK = ".train.lock"  # in the run folder while a trainer writes it (`_hold_run_folder`)


# ---------------------------------------------------------------- setup helpers


class Batches:
    """Deterministic micro-batches from packed blocks [N, T]: shuffled by seed, one permutation per
    epoch, sharded by process. The batch is a pure function of (step, micro, process), so resuming
    needs only the step."""

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int, labels: np.ndarray | None = None, skip: int = 0):
        if len(blocks) == 0:
            raise ValueError("no training blocks: the corpus is smaller than one sequence")
        self.blocks, self.labels, self.B, self.seed = blocks, labels, batch_size, seed
        self.skip = skip  # micro-batches an earlier phase took from this stream (train.skip_tokens)
        self._perm_epoch, self._perm = -1, None

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The index-th global micro-batch after the skipped ones: input_ids [B, T] (and labels)."""
        N = len(self.blocks)
        rows = []
        first = (self.skip + index) * self.B
        for j in range(first, first + self.B):
            epoch, pos = divmod(j, N)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(N)
                self._perm_epoch = epoch
            rows.append(self._perm[pos])
        ids = torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64))
        lab = None if self.labels is None else torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        return ids, lab

    def step(self, step: int, grad_accum: int, accelerator) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """This process's grad_accum micro-batches of optimizer step `step`, on its device: global
        micro-batch (step * grad_accum + micro) * processes + rank."""
        out = []
        for micro in range(grad_accum):
            ids, labels = self.get((step * grad_accum + micro) * accelerator.num_processes + accelerator.process_index)
            out.append((ids.to(accelerator.device), labels.to(accelerator.device) if labels is not None else None))
        return out


class MetricsLog:
    """metrics.csv: header from the first row; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.columns: list[str] | None = None
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = list(csv.DictReader(f))
            if rows:
                self.columns = list(rows[0].keys())
            self._rewrite([r for r in rows if int(r["step"]) <= resume_step])
        elif path.exists():
            path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")  # csv's own \r\n line ends, as write() appends them
        if self.columns:
            w = csv.DictWriter(text, self.columns)
            w.writeheader()
            w.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def write(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.columns})
            f.flush()
            os.fsync(f.fileno())


def _fmt(x) -> str:
    if isinstance(x, float):
        return repr(x)
    return str(x)


# ---------------------------------------------------------------- train


def _has_accelerator() -> bool:
    """A GPU (or other torch accelerator) is present."""
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _run_of(out: Path, cfg: ExperimentConfig, restart_on_config_change: bool) -> str:
    """What --output-dir holds: "none" (no config.yaml), "same" (a run of cfg) or "other" (a run of
    a different config: an error unless restart_on_config_change; then `_clear_run` deletes it once
    setup has succeeded)."""
    check_output_folder(out, "--output-dir")
    if not (out / "config.yaml").is_file():
        # A run writes config.yaml first (after its lock), so other files here are someone else's,
        # which the run's student/, metrics.csv or run.json could replace (hidden ones, like the
        # lock or a .gitkeep, it never writes).
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
        if others:
            raise ValueError(
                f"--output-dir {str(out)!r} holds files but no run ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder"
            )
        return "none"
    if same_experiment((out / "config.yaml").read_text(), cfg):
        return "same"
    if not restart_on_config_change:
        raise ValueError(
            f"{out} holds a run of a different config; choose another --output-dir (or pass --restart-on-config-change)"
        )
    return "other"


def _clear_run(out: Path) -> None:
    """Delete a run's outputs (the folder stays), for a restart under another config; config.yaml
    last, so that a clear cut off part-way leaves a run folder, which the next restart clears."""
    for name in ("run.json", "metrics.csv"):
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "exports", "student", "trackers"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "config.yaml").unlink(missing_ok=True)


def _is_complete(out: Path) -> bool:
    """The folder's run.json says its run is complete."""
    record = out / "run.json"
    return record.is_file() and json.loads(record.read_text()).get("status") == "complete"


def _accelerator(mixed_precision: str, **trackers) -> Accelerator:
    """This process's Accelerator: one process, or one of WORLD_SIZE launched by torchrun /
    accelerate launch (several without a GPU: accelerate's CPU data parallelism over gloo, which it
    only turns on when asked: accelerate launch --cpu sets ACCELERATE_USE_CPU, plain torchrun
    would not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    precision = resolve_mixed_precision(mixed_precision)
    accelerator = make_accelerator(precision, cpu=world > 1 and not _has_accelerator(), **trackers)
    if accelerator.num_processes != world:
        raise ValueError(
            f"WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} process(es): "
            "launch with `accelerate launch` or torchrun on a supported backend"
        )
    _check_launch(accelerator)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what accelerate launch was told
    if launcher not in (None, precision) and accelerator.is_main_process:
        print(
            f"lrc: train.mixed_precision={precision} (the config's) overrides the launcher's {launcher}",
            file=sys.stderr,
        )
    return accelerator


def _check_launch(accelerator: Accelerator) -> None:
    """What the launcher set up is what the trainer supports: whole parameters in every process,
    and its own gradient accumulation (train.grad_accum) only."""
    kind = accelerator.distributed_type
    if kind != DistributedType.NO and kind not in DDP_TYPES:
        # Checkpoints, the accumulation window and the gradient clipping read whole parameters.
        raise ValueError(
            f"accelerate's distributed_type {kind.value} shards the parameters, which lrc train does "
            "not support: train in one process or data-parallel (config/accelerate/ddp.yaml, or torchrun)"
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"accelerate was asked for {accelerator.gradient_accumulation_steps} gradient accumulation "
            "steps (ACCELERATE_GRADIENT_ACCUMULATION_STEPS / --gradient_accumulation_steps), which would "
            "scale the gradients again: set train.grad_accum instead and leave accelerate's at 1"
        )


@dataclass
class _Session:
    """What setup builds for one training session (one process of the run)."""

    accelerator: Accelerator
    method: torch.nn.Module  # as accelerate prepared it (DDP-wrapped when distributed)
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[tuple[str, torch.nn.Parameter]]
    batches: Batches
    heldout: np.ndarray
    tokenizer: object
    identity: dict[str, str]  # the teacher's and the data's, recorded in each checkpoint (`Inputs`)
    tracker_names: list[str]
    total_steps: int
    tokens_per_step: int
    # LRC's one weight generation per optimizer step when accumulating (lrc_src.step), else None
    window: Callable | None
    compiled: bool


def train(
    cfg: ExperimentConfig,
    output_dir: str | Path,
    progress: bool = True,
    threads: int | None = None,
    restart_on_config_change: bool = False,
    keep_memory: bool = True,
) -> Path:
    """Train cfg.method; resume if output_dir holds a checkpoint of the same config (one at the last
    step, without run.json, only writes the student and run.json again). Returns output_dir.

    A folder holding a run of a different config, or a checkpoint of other inputs (teacher, data,
    start: `assets.Inputs`), is an error, unless restart_on_config_change: then that run is deleted
    and training starts again (the workflow's choice: it owns its folders). So is a folder that
    another process is training, always.
    keep_memory: on the CPU, `keep_freed_memory()` (faster steps; resident memory stays at its peak).
    Whether the decoder layers are compiled is cfg.train.compile's choice (`runtime.resolve_compile`).
    """
    out = Path(output_dir)
    held = _run_of(out, cfg, restart_on_config_change)
    if held == "same" and _is_complete(out):
        return out
    if os.environ.get("RANK", "0") == "0":  # refused before setup loads a teacher into memory that run may need
        refuse_if_locked(out / LOCK, _busy(out))
    set_threads(threads)
    run = _setup(cfg, out, keep_memory, progress)
    with _hold_run_folder(run, out):
        # Again, now that no one else writes here: another trainer may have done so during setup.
        held = _run_of(out, cfg, restart_on_config_change)
        if held == "same" and _is_complete(out):
            return out
        changed = _changed_inputs(run, out) if held == "same" else None
        if changed and not restart_on_config_change:
            raise ValueError(f"{changed}: give the run the inputs it was trained with, or train it again")
        run.accelerator.wait_for_everyone()  # every process has read the folder before it changes
        if held == "other" or changed:  # with --restart-on-config-change: trained again, from the start
            if run.accelerator.is_main_process:
                _clear_run(out)
            run.accelerator.wait_for_everyone()
        start = _resume(run, cfg, out)
        _loop(run, cfg, out, start, progress)
        _finish(run, cfg, out)
    return out


@contextlib.contextmanager
def _hold_run_folder(run: _Session, out: Path) -> Iterator[None]:
    """The main process holds out/.train.lock while the run writes its folder (removed at the end,
    released by the system if the process is killed): a second trainer of the same folder, e.g. a
    second command or the workers of a launcher killed alone, is refused instead of writing
    checkpoints and metrics between this run's."""
    main = run.accelerator.is_main_process
    with locked(out / LOCK, busy=_busy(out)) if main else contextlib.nullcontext():
        run.accelerator.wait_for_everyone()  # the other processes go on once the folder is held
        yield


def _busy(out: Path) -> str:
    return f"{out} is being trained by another process: let it finish, or stop it, before training this folder"


def _changed_inputs(run: _Session, out: Path) -> str | None:
    """How the teacher, data or start of this session differ from those of the folder's checkpoint,
    or None; a finished run's data no longer matters (it is finalised again, not trained)."""
    found = find_checkpoint(out)
    if found is None:
        return None
    state = read_state(found)
    finished = state.get("step") == run.total_steps
    why = changed_inputs(state, run.identity, ("teacher", "start") if finished else ("teacher", "start", "data"))
    return f"{found}: {why}" if why else None


def _setup(cfg: ExperimentConfig, out: Path, keep_memory: bool, progress: bool = True) -> _Session:
    """Teacher, data, method, optimizer and schedule, prepared by accelerate. Everything that can
    fail on user input happens here, before the run folder is written."""
    tc = cfg.train
    tracker_names = trackers.parse_log_with(tc.log_with)
    accelerator = _accelerator(tc.mixed_precision, **trackers.accelerator_arguments(tracker_names, out))
    if keep_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(tc.seed)
    inputs = load_inputs(cfg, progress=progress and accelerator.is_main_process)
    skip = tc.skip_tokens // cfg.micro_tokens()  # whole micro-batches (checked by the config)
    batches = Batches(inputs.train, tc.batch_size, tc.seed, inputs.labels, skip=skip)
    identity = inputs.identity()  # before the teacher moves: the same on every device
    method = build_method(cfg, inputs.teacher, inputs.train)
    if cfg.baseline.init_from is not None:  # the student it starts from, before a checkpoint replaces it
        identity["start"] = fingerprint(method.student)
    method = method.to(accelerator.device)
    tokens_per_step = cfg.step_tokens(accelerator.num_processes)
    total_steps = math.ceil(tc.max_tokens / tokens_per_step) if tc.max_tokens else tc.max_steps
    compile_layers = resolve_compile(
        tc.compile, accelerator.device.type, total_steps, compilable=getattr(method, "compilable", True)
    )
    if compile_layers:
        method.compile_layers()

    params = method.trainable_named_parameters()
    fused = accelerator.device.type == "cuda"  # fused AdamW on CUDA
    optimizer = make_optimizer(params, tc, kernel="fused" if fused else "default")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, tc.warmup_ratio))
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    return _Session(
        accelerator=accelerator,
        method=method,
        unwrapped=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        batches=batches,
        heldout=inputs.heldout,
        tokenizer=inputs.tokenizer,
        identity=identity,
        tracker_names=tracker_names,
        total_steps=total_steps,
        tokens_per_step=tokens_per_step,
        window=accumulation_window(unwrapped, tc.grad_accum),
        compiled=bool(compile_layers),
    )


def _resume(run: _Session, cfg: ExperimentConfig, out: Path) -> int:
    """Load the folder's last checkpoint, if any, and write config.yaml; returns the step to start at."""
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    found = find_checkpoint(out)  # checkpoint/, or checkpoint.old/ if a save was cut off mid-swap
    if found is not None:
        # A checkpoint at the last step is a finished run whose run.json is gone (snakemake deletes
        # a job's outputs before running it again): nothing is left to train, so its trainable state
        # suffices (the optimizer's may have been dropped) and the run is finalised again, not retrained.
        state = read_state(found)
        finished = state.get("step") == run.total_steps
        saved_by, processes = state.get("processes", 1), run.accelerator.num_processes
        if not finished and saved_by != processes:  # each process's batch stream depends on it
            raise ValueError(
                f"{found} was saved by a run of {saved_by} process(es) and this launch has {processes}: "
                f"resume it with {saved_by}, or delete {out} to start over"
            )
        resume = () if finished else (run.optimizer, run.scheduler)
        start = load_checkpoint(found, run.unwrapped, *resume)
        if finished and run.accelerator.is_main_process:
            print(
                f"{out} finished at step {start}: writing its student and run.json again from the "
                "checkpoint (delete the folder to train it again)",
                file=sys.stderr,
            )
        elif run.accelerator.is_main_process:  # the log of a resumed job says where it went on
            print(f"{out}: resuming from the checkpoint of step {start} of {run.total_steps}", file=sys.stderr)
    if run.accelerator.is_main_process:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    return start


def _loop(run: _Session, cfg: ExperimentConfig, out: Path, start: int, progress: bool) -> None:
    """Optimizer steps start..total_steps: log every log_every, evaluate every eval_every, export at
    export_at, save every save_every, and all of them at the last step."""
    tc, accelerator, ckpt = cfg.train, run.accelerator, out / "checkpoint"
    log = MetricsLog(out / "metrics.csv", start) if accelerator.is_main_process else None
    trackers.start(accelerator, run.tracker_names, out, cfg.to_dict(), start)
    run.method.train()
    # under DDP the window's gradients are averaged by hand after its closing backward
    manual_sync = run.window is not None and accelerator.num_processes > 1
    trainable = [p for _, p in run.params]
    show = progress and accelerator.is_main_process
    budget, available = run.total_steps * run.tokens_per_step, run.batches.blocks.size
    if budget > available and accelerator.is_main_process and start == 0:
        more = "a larger corpus or data.max_train_tokens"
        if cfg.method == "sft":
            more = "more conversations in sft.chat_data"
        print(
            f"lrc: note: the run's {budget:,} tokens pass {budget / available:.1f} times over the "
            f"{available:,} tokens of its training blocks ({more} gives more)",
            file=sys.stderr,
        )
    bar = tqdm(total=run.total_steps, initial=start, desc=cfg.method, unit="step", disable=not show, dynamic_ncols=True)
    t_last, tokens_last, t0 = time.perf_counter(), start * run.tokens_per_step, time.perf_counter()
    for step in range(start, run.total_steps):
        lr_now = run.optimizer.param_groups[0]["lr"]
        micro_batches = run.batches.step(step, tc.grad_accum, accelerator)
        try:
            sums, grad_norm = train_step(
                run.method,
                micro_batches,
                run.optimizer,
                trainable,
                tc.grad_clip,
                accelerator,
                run.window,
                manual_sync,
                run.scheduler,
            )
        except NonFiniteLossError as e:
            bar.close()
            last_good = ckpt if ckpt.is_dir() else "none"
            raise NonFiniteLossError(
                f"{e} at step {step + 1}; last good checkpoint: {last_good} (lower train.lr or check the data)"
            ) from None
        done = step + 1
        tokens = done * run.tokens_per_step
        bar.update(1)
        bar.set_postfix(
            loss=f"{sums['loss']:.3f}", tok_s=f"{(tokens - tokens_last) / max(time.perf_counter() - t_last, 1e-9):.0f}"
        )

        is_last = done == run.total_steps
        evaluate_now = is_last or (tc.eval_every and done % tc.eval_every == 0)
        if accelerator.is_main_process and (done % tc.log_every == 0 or evaluate_now):
            now = time.perf_counter()
            row = {
                "step": done,
                "tokens": tokens,
                "lr": lr_now,
                **sums,
                "grad_norm": float(grad_norm),
                "tokens_per_s": (tokens - tokens_last) / max(now - t_last, 1e-9),
                "elapsed_s": now - t0,
                "heldout_loss": "",
            }
            if evaluate_now:
                eval_rows = run.heldout[: tc.eval_batches * tc.batch_size]
                row["heldout_loss"] = heldout_loss(run.unwrapped.eval_model(), eval_rows, tc.batch_size, accelerator)
            log.write({k: _fmt(v) for k, v in row.items()})
            trackers.log_row(accelerator, row, done)
            t_last, tokens_last = time.perf_counter(), tokens
        if accelerator.is_main_process and done in tc.export_at:
            _export_atomic(run.unwrapped, out / "exports" / f"step_{done}", run.tokenizer, with_trainable=True)
        if accelerator.is_main_process and (done % tc.save_every == 0 or is_last):
            save_checkpoint(
                ckpt, run.unwrapped, run.optimizer, run.scheduler, done, accelerator.num_processes, run.identity
            )
        accelerator.wait_for_everyone()
    bar.close()


def _finish(run: _Session, cfg: ExperimentConfig, out: Path) -> None:
    """Write the student, trim the checkpoint, then the model card and run.json: run.json last, so
    that its presence means every other file is in place."""
    tc, accelerator, ckpt = cfg.train, run.accelerator, out / "checkpoint"
    if accelerator.is_main_process:
        _export_atomic(run.unwrapped, out / "student", run.tokenizer)
        discard_stale_copies(ckpt)  # a checkpoint.old/ left by a final save cut off after its swap
        if not tc.keep_optimizer_state:  # a finished run needs only its trainable state (export, analysis)
            drop_optimizer_state(ckpt)
        info = {
            "status": "complete",
            "method": cfg.method,
            "steps": run.total_steps,
            "tokens": run.total_steps * run.tokens_per_step,
            "trainable_parameters": sum(p.numel() for _, p in run.params),
            "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes,
            "accumulation_window": run.window is not None,  # student weights generated once per optimizer step
            "compiled_layers": run.compiled,  # in the session that finished it (resumes may differ)
            "software": software(accelerator.device.type),  # likewise; bf16 rounds by CPU model too
            # What the run learned and logged: a run trained again to another result gets another
            # record, so the workflow rebuilds what reads it (snakemake skips a job whose newer
            # input has the same content); finishing it again from its checkpoint keeps the record
            # (on the same stack and device: on another, what reads it is made again there too).
            "trainable_sha256": read_state(ckpt)["files"][TRAINABLE]["sha256"],
            "metrics_sha256": sha256_file(out / "metrics.csv"),
        }
        write_model_card(out, info)
        atomic_write_text(out / "run.json", json.dumps(info, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers, if any (and the process group: last)


def _export_atomic(method, directory: Path, tokenizer, with_trainable: bool = False) -> None:
    """Export the student to directory/ atomically; with_trainable also writes the trainable state
    there as projections.safetensors (same keys as checkpoint/trainable.safetensors: for LRC the
    projections P and student norms at that step, for Tables 21-22)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    method.export(tmp, tokenizer)
    if with_trainable:
        state = {n: p.detach().cpu().contiguous() for n, p in method.trainable_named_parameters()}
        save_file(state, tmp / "projections.safetensors")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """A run folder's training method with the trainable state of its last checkpoint, and its
    tokenizer: `method(ids)` gives the loss, `method.eval_model()` the student as an HF model,
    `method.export(folder, tokenizer)` writes it; for LRC, `method.clone` is the `LowRankClone`
    (its projections, `clone(ids)`). E.g. `method, tokenizer = load_run("runs/lrc")`."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run folder (needs config.yaml and checkpoint/)")
    found = find_checkpoint(run)  # checkpoint/, or checkpoint.old/ if a save was cut off
    if found is None:
        raise FileNotFoundError(f"{str(run)!r} holds no checkpoint/")
    cfg = load_config(run / "config.yaml")
    teacher, tokenizer = load_models(cfg)  # no data: the checkpoint holds every trainable tensor
    why = changed_inputs(read_state(found), {"teacher": fingerprint(teacher)}, ("teacher",))
    if why:
        raise ValueError(f"{found}: {why}: give it the teacher it was trained with")
    method = build_method(cfg, teacher, None)
    load_checkpoint(found, method)
    return method, tokenizer


def export_run(run_dir: str | Path, output: str | Path) -> Path:
    """Export the student of run_dir's last checkpoint to `output` (plain HF folder + tokenizer), a
    new folder: an existing file or non-empty folder is refused, never replaced."""
    out = Path(output)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"--output {str(out)!r} exists; lrc export writes a new folder (choose another)")
    check_output_folder(out, "--output")
    method, tokenizer = load_run(run_dir)
    _export_atomic(method, out, tokenizer)
    return out
