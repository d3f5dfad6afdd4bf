"""One trainer for LRC and every baseline: `train(cfg, output_dir)`.

Reads top to bottom: setup (teacher, data, method; every user error is raised here, before the
run folder is touched), `accelerator.prepare`, resume from the last checkpoint, the loop, save.

Run folder:
    config.yaml        the resolved config
    metrics.csv        one row per log_every steps: step, tokens, lr, loss, every loss term,
                       grad_norm, tokens_per_s, heldout_loss (every eval_every steps and at the end)
    checkpoint/        trainable state (safetensors), optimizer, scheduler, RNG, step
    exports/step_N/    students exported at train.export_at steps, plus projections.safetensors
                       (the trainable state at that step, as in checkpoint/)
    student/           the final student as a plain HF folder with tokenizer
    run.json           written last: {"status": "complete", ...}; its absence means incomplete

Re-running the same command on the same folder resumes from checkpoint/ (metrics rows after the
checkpoint are dropped and recomputed), so a killed run continues exactly as if uninterrupted.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lrc_src.baselines import LRCMethod, StudentKD, TinyBERTStyle, hard_prune, load_causal_lm, student_like
from lrc_src.clone import LowRankClone
from lrc_src.checkpoint import drop_optimizer_state, find_checkpoint, load_checkpoint, save_checkpoint
from lrc_src.config import ExperimentConfig, dump_config
from lrc_src.losses import lm_loss

TIMING_COLUMNS = ("tokens_per_s", "elapsed_s")  # the only columns that differ between reruns


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------- setup helpers


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> 'bf16' on CUDA with bf16, or on a CPU with native bf16 (avx512_bf16/amx); else 'no'."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


class Batches:
    """Deterministic micro-batches from packed blocks [N, T]: shuffled by seed, one permutation per
    epoch, sharded by process. The batch is a pure function of (step, micro, process), so resuming
    needs only the step."""

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int, labels: np.ndarray | None = None):
        if len(blocks) == 0:
            raise ValueError("no training blocks: the corpus is smaller than one sequence")
        self.blocks, self.labels, self.B, self.seed = blocks, labels, batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The index-th global micro-batch: input_ids [B, T] (and labels)."""
        N = len(self.blocks)
        rows = []
        for j in range(index * self.B, (index + 1) * self.B):
            epoch, pos = divmod(j, N)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(N)
                self._perm_epoch = epoch
            rows.append(self._perm[pos])
        ids = torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64))
        lab = None if self.labels is None else torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        return ids, lab


def build_method(cfg: ExperimentConfig, teacher, train_blocks: np.ndarray) -> torch.nn.Module:
    """The method module for cfg.method (see lrc_src.baselines for what each one trains)."""
    b, d_S, seed = cfg.baseline, cfg.lrc.student_hidden_size, cfg.train.seed
    kd = dict(kl_temperature=b.kl_temperature, kl_reduction=b.kl_reduction)

    def calibration() -> torch.Tensor:  # the first calibration_batches training batches: [N, T]
        n = b.calibration_batches * cfg.train.batch_size
        return torch.from_numpy(np.asarray(train_blocks[:n], dtype=np.int64))
    if cfg.method == "lrc":
        torch.manual_seed(seed)
        clone = LowRankClone(teacher, cfg.lrc)
        if cfg.lrc.init != "normal":
            clone.init_from_teacher(calibration())
        return LRCMethod(clone)
    if cfg.method == "scratch":
        return StudentKD(student_like(teacher, d_S, seed))
    if cfg.method == "kd":
        return StudentKD(student_like(teacher, d_S, seed), teacher if b.use_kl else None, **kd)
    if cfg.method == "tinybert":
        torch.manual_seed(seed)
        return TinyBERTStyle(student_like(teacher, d_S, seed), teacher, b.hidden_weight, b.attn_weight, **kd)
    if cfg.method == "prune_kd":  # LRC's start (lrc.init; "normal" means "prune"), exported, then KD
        init = "prune" if cfg.lrc.init == "normal" else cfg.lrc.init
        start = hard_prune(teacher, d_S, calibration(), init=init, untie_lm_head=cfg.lrc.untie_lm_head)
        return StudentKD(start, teacher if b.use_kl else None, **kd)
    if cfg.method == "sft":
        return StudentKD(teacher)  # for sft the "teacher" slot holds the model being fine-tuned
    raise AssertionError(cfg.method)


ADAMW_KERNELS = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}


def make_optimizer(named_params: list[tuple[str, torch.Tensor]], tc, kernel: str = "default") -> torch.optim.AdamW:
    """AdamW over a method's trainable parameters: matrices at tc.lr, vectors (norms) at tc.lr_norm
    (default tc.lr); betas and weight decay from tc (a TrainConfig).

    kernel: "default" (PyTorch's choice: foreach on CUDA, one tensor at a time on the CPU), "fused"
    (one launch per step for all tensors; the same update up to rounding; the trainer's choice on
    CUDA without sharding) or "foreach".
    """
    if kernel not in ADAMW_KERNELS:
        raise ValueError(f"AdamW kernel {kernel!r}: choose one of {', '.join(ADAMW_KERNELS)}")
    norm_lr = tc.lr_norm if tc.lr_norm is not None else tc.lr
    groups = [
        {"params": [p for n, p in named_params if p.ndim >= 2], "lr": tc.lr},
        {"params": [p for n, p in named_params if p.ndim < 2], "lr": norm_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(tc.betas),
                             weight_decay=tc.weight_decay, **ADAMW_KERNELS[kernel])


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio * total steps, then linear decay to 0 (paper)."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f


def _set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (<malloc.h>)


def glibc():
    """The process's C library if it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def keep_freed_memory() -> bool:
    """Make this process reuse the memory its CPU tensors free instead of handing it back to the OS.

    glibc serves every large allocation (any above 32 MB, and by default any above a threshold that
    adapts up to that) with a fresh mmap and unmaps it on free, and trims the heap's free top past
    128 KB, so each training step page-faults (and the kernel zeroes) its working set anew: at the
    tiny shapes on 2 cores 0.6-1.5 s of system time in a 9 s LRC step of 4 x 1024 tokens, 0.3-0.5 s
    in the bound's 7 s (benchmarks/throughput.py). No mmap (M_MMAP_MAX 0) and no trimming (trim
    threshold SIZE_MAX) keep freed memory in the heap, where the next step reuses it: resident memory
    stays at its peak. (The 2 GB threshold used before still trims a free top above 2 GB: strace
    shows a freed 2.1 GB tensor given back and faulted in again on the next allocation. LRC's
    working set at batch 16 x 256 is 6 GB.)
    Nothing else changes (same values, bit for bit). Returns whether it was applied: glibc only.
    """
    libc = glibc()
    if libc is None:
        return False
    # mallopt's int -1 becomes glibc's size_t trim threshold SIZE_MAX: the heap is never trimmed
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


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
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            if self.columns:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(rows)
        tmp.replace(self.path)

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


@torch.no_grad()
def heldout_loss(model, heldout: np.ndarray, n_blocks: int, batch_size: int, accelerator) -> float:
    """Mean next-token LM loss (nats/token) of the student on the first n_blocks held-out blocks."""
    blocks = np.asarray(heldout[:n_blocks], dtype=np.int64)
    if len(blocks) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[i : i + batch_size]).to(accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=ids).logits
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += lm_loss(logits, ids).item() * n
        count += n
    model.train(was_training)
    return total / count


def load_inputs(cfg: ExperimentConfig):
    """(teacher, tokenizer, train blocks [N, T], train labels or None, held-out blocks) for cfg.

    For method=sft the "teacher" is the model being fine-tuned and the blocks are chat examples."""
    from lrc_src.teachers import load_teacher  # heavy deps load only when training

    if cfg.method == "sft":
        from transformers import AutoTokenizer

        from lrc_src.chat import encode_chat_file

        if not cfg.sft.chat_data:
            raise ValueError("method=sft needs sft.chat_data (a jsonl of {'messages': [...]})")
        model = load_causal_lm(cfg.sft.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.sft.model)
        ids, labels = encode_chat_file(tokenizer, cfg.sft.chat_data, cfg.data.seq_len)
        n_held = max(1, int(round(len(ids) * cfg.data.heldout_frac)))
        if n_held >= len(ids):
            raise ValueError(f"sft.chat_data {cfg.sft.chat_data!r} has too few conversations ({len(ids)})")
        return model, tokenizer, ids[n_held:], labels[n_held:], ids[:n_held]
    teacher, tokenizer = load_teacher(cfg.teacher)
    data = _packed_data(cfg, tokenizer)
    return teacher, tokenizer, data.train, None, data.heldout


def _packed_data(cfg: ExperimentConfig, tokenizer):
    """The tokenised, packed corpus of cfg.data (cached on disk by lrc_src.packing)."""
    from lrc_src.packing import prepare_data

    corpus = {"mix": cfg.data.mix, "data_files": cfg.data.mix_files or {}} if cfg.data.mix else cfg.data.corpus
    return prepare_data(tokenizer, corpus, cfg.data.seq_len, heldout_frac=cfg.data.heldout_frac,
                        seed=cfg.data.seed, max_train_tokens=cfg.data.max_train_tokens)


def prepare_assets(cfg: ExperimentConfig, output_dir: str | Path, threads: int | None = None) -> dict:
    """Fetch/convert the teacher and tokenise the data once for a profile, so that parallel runs
    reuse the caches. Writes output_dir/assets.json (teacher folder, held-out documents, token
    counts, the teacher's held-out loss on the same blocks the runs evaluate) and a copy of the
    held-out documents as output_dir/heldout.jsonl."""
    from lrc_src.teachers import teacher_folder

    _set_threads(threads)
    out = Path(output_dir)
    teacher, tokenizer, train_blocks, _, heldout = load_inputs(cfg)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    n = cfg.train.eval_batches * cfg.train.batch_size
    info = {
        "teacher": cfg.teacher,
        "teacher_folder": str(teacher_folder(cfg.teacher)) if cfg.method != "sft" else cfg.sft.model,
        "train_blocks": int(len(train_blocks)), "heldout_blocks": int(len(heldout)),
        "seq_len": cfg.data.seq_len,
        "teacher_heldout_loss": heldout_loss(teacher, heldout, n, cfg.train.batch_size, accelerator),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    link = out / "teacher"  # a stable path to the teacher's HF folder, for `lrc eval`
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(info["teacher_folder"]).resolve(), target_is_directory=True)
    if cfg.method != "sft":
        src = _packed_data(cfg, tokenizer).heldout_path  # cached: returns at once
        shutil.copyfile(src, out / "heldout.jsonl.tmp")
        (out / "heldout.jsonl.tmp").replace(out / "heldout.jsonl")
        info["heldout_path"] = str((out / "heldout.jsonl").resolve())
    tmp = out / "assets.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out / "assets.json")
    return info


def export_run(cfg: ExperimentConfig, run_dir: str | Path, output: str | Path) -> Path:
    """Export the student of run_dir's last checkpoint to `output` (plain HF folder + tokenizer)."""
    teacher, tokenizer, train_blocks, _, _ = load_inputs(cfg)
    method = build_method(cfg, teacher, train_blocks)
    state = load_file(Path(run_dir) / "checkpoint" / "trainable.safetensors")
    with torch.no_grad():
        for n, p in method.trainable_named_parameters():
            p.copy_(state[n])
    _export_atomic(method, Path(output), tokenizer)
    return Path(output)


# ---------------------------------------------------------------- train


def _has_accelerator() -> bool:
    """A GPU (or other torch accelerator) is present."""
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


# data-parallel types whose replicas hold whole parameters: the accumulation window's gradients
# can be averaged by hand (see train())
DDP_TYPES = tuple(getattr(DistributedType, n) for n in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU",
                                                         "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU")
                  if hasattr(DistributedType, n))


def average_gradients(params: list[torch.Tensor], accelerator: Accelerator) -> None:
    """Average p.grad over the processes (one all-reduce of a flat buffer), as DDP's sync would;
    a parameter without a gradient counts as zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")  # [sum numel]
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def train(cfg: ExperimentConfig, output_dir: str | Path, progress: bool = True, threads: int | None = None,
          restart_on_config_change: bool = False, keep_memory: bool = True, compile_layers: bool = False) -> Path:
    """Train cfg.method; resume if output_dir holds a checkpoint of the same config. Returns output_dir.

    A folder holding a run of a different config is an error, unless restart_on_config_change:
    then that run is deleted and training starts again (the workflow's choice: it owns its folders).
    keep_memory: on the CPU, `keep_freed_memory()` (faster steps; resident memory stays at its peak).
    compile_layers: torch.compile the method's decoder layers (`compile_layers()` of the method:
        regional compilation, one graph for all layers; the first step compiles). A runtime choice
        like threads, not part of the config: a run may resume with or without it.
    """
    out = Path(output_dir)
    saved = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else None
    if saved is not None and saved != dump_config(cfg) and restart_on_config_change:
        for name in ("run.json", "metrics.csv", "config.yaml"):
            (out / name).unlink(missing_ok=True)
        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "exports", "student"):
            shutil.rmtree(out / name, ignore_errors=True)
        saved = None
    if (out / "run.json").is_file() and json.loads((out / "run.json").read_text()).get("status") == "complete":
        if saved == dump_config(cfg):
            return out
        raise ValueError(f"{out} holds a completed run of a different config; choose another --output-dir "
                         "(or pass --restart-on-config-change)")
    _set_threads(threads)
    tc = cfg.train

    # ---- setup: everything that can fail on user input happens before the run folder is written
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    # several processes without a GPU: accelerate's CPU data parallelism (gloo); it only turns that on
    # when asked (accelerate launch --cpu sets ACCELERATE_USE_CPU), plain torchrun would not
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tc.mixed_precision),
                              cpu=world > 1 and not _has_accelerator())
    if accelerator.num_processes != world:
        raise ValueError(f"WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} process(es): "
                         "launch with `accelerate launch` or torchrun on a supported backend")
    if keep_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(tc.seed)
    teacher, tokenizer, train_blocks, train_labels, heldout = load_inputs(cfg)
    batches = Batches(train_blocks, tc.batch_size, tc.seed, train_labels)
    method = build_method(cfg, teacher, train_blocks).to(accelerator.device)
    if compile_layers:
        method.compile_layers()
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.data.seq_len * accelerator.num_processes
    total_steps = math.ceil(tc.max_tokens / tokens_per_step) if tc.max_tokens else tc.max_steps

    params = method.trainable_named_parameters()
    # whole parameters in this process (one process or DDP); FSDP/DeepSpeed shard them
    unsharded = accelerator.num_processes == 1 or accelerator.distributed_type in DDP_TYPES
    fused = accelerator.device.type == "cuda" and unsharded  # fused AdamW on CUDA
    optimizer = make_optimizer(params, tc, kernel="fused" if fused else "default")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, tc.warmup_ratio))
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)

    # ---- resume
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    start = 0
    found = find_checkpoint(out)  # checkpoint/, or checkpoint.old/ if a save was cut off mid-swap
    if found is not None:  # `saved`: the folder's config.yaml, read (or cleared by a restart) above
        if saved is not None and saved != dump_config(cfg):
            raise ValueError(f"{out} holds a checkpoint of a different config; choose another --output-dir "
                             "(or pass --restart-on-config-change)")
        start = load_checkpoint(found, unwrapped, optimizer, scheduler)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(dump_config(cfg))
    log = MetricsLog(out / "metrics.csv", start) if accelerator.is_main_process else None

    # ---- loop
    method.train()
    # One weight generation per optimizer step when accumulating. Under DDP every micro-batch runs
    # without gradient sync and the gradients are averaged after the window's closing backward
    # (DDP's own sync would miss that backward); FSDP/DeepSpeed shard the parameters: no window.
    reuse = tc.grad_accum > 1 and hasattr(unwrapped, "accumulation_window") and unsharded
    manual_sync = reuse and accelerator.num_processes > 1
    window = unwrapped.accumulation_window if reuse else contextlib.nullcontext
    bar = tqdm(total=total_steps, initial=start, desc=f"{cfg.method}", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    t_last, tokens_last, t0 = time.perf_counter(), start * tokens_per_step, time.perf_counter()
    for step in range(start, total_steps):
        lr_now = [g["lr"] for g in optimizer.param_groups][0]
        sums: dict[str, float] = {}
        with window():  # LRC: generate the student's weights once per optimizer step
            for micro in range(tc.grad_accum):
                index = (step * tc.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
                ids, labels = batches.get(index)
                ids = ids.to(accelerator.device)
                labels = labels.to(accelerator.device) if labels is not None else None
                sync = micro == tc.grad_accum - 1 and not manual_sync
                with accelerator.no_sync(method) if not sync else contextlib.nullcontext():
                    with accelerator.autocast():
                        o = method(ids, labels)
                    if not torch.isfinite(o.loss):
                        bar.close()
                        raise NonFiniteLossError(
                            f"non-finite loss ({o.loss.item()}) at step {step + 1}; last good checkpoint: "
                            f"{ckpt if ckpt.is_dir() else 'none'} (lower train.lr or check the data)")
                    accelerator.backward(o.loss / tc.grad_accum)
                for k, v in [("loss", o.loss)] + list(o.losses.items()):
                    sums[k] = sums.get(k, 0.0) + v.detach().float().item() / tc.grad_accum
        if manual_sync:
            average_gradients([p for _, p in params], accelerator)
        grad_norm = accelerator.clip_grad_norm_([p for _, p in params], tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens = done * tokens_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{(tokens - tokens_last) / max(time.perf_counter() - t_last, 1e-9):.0f}")

        is_last = done == total_steps
        evaluate_now = is_last or (tc.eval_every and done % tc.eval_every == 0)
        if accelerator.is_main_process and (done % tc.log_every == 0 or evaluate_now):
            now = time.perf_counter()
            row = {"step": done, "tokens": tokens, "lr": lr_now, **sums,
                   "grad_norm": float(grad_norm), "tokens_per_s": (tokens - tokens_last) / max(now - t_last, 1e-9),
                   "elapsed_s": now - t0, "heldout_loss": ""}
            if evaluate_now:
                row["heldout_loss"] = heldout_loss(unwrapped.eval_model(), heldout, tc.eval_batches * tc.batch_size,
                                                   tc.batch_size, accelerator)
            log.write({k: _fmt(v) for k, v in row.items()})
            t_last, tokens_last = time.perf_counter(), tokens
        if accelerator.is_main_process and done in tc.export_at:
            _export_atomic(unwrapped, out / "exports" / f"step_{done}", tokenizer, with_trainable=True)
        if accelerator.is_main_process and (done % tc.save_every == 0 or is_last):
            save_checkpoint(ckpt, unwrapped, optimizer, scheduler, done)
        accelerator.wait_for_everyone()
    bar.close()

    # ---- save
    if accelerator.is_main_process:
        _export_atomic(unwrapped, out / "student", tokenizer)
        info = {"status": "complete", "method": cfg.method, "steps": total_steps,
                "tokens": total_steps * tokens_per_step, "trainable_parameters":
                sum(p.numel() for _, p in params), "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes,
                "accumulation_window": reuse}  # student weights generated once per optimizer step
        (out / "run.json").write_text(json.dumps(info, indent=2))
        if not tc.keep_optimizer_state:  # a finished run needs only its trainable state (export, analysis)
            drop_optimizer_state(ckpt)
    accelerator.wait_for_everyone()
    return out


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
