"""What a config trains and how: the method module (`build_method`), its AdamW (`make_optimizer`)
and its learning-rate schedule (`lr_lambda`).

The trainer (lrc_src.train), `lrc export` and benchmarks/throughput.py build every method through
these, so a benchmarked method is the trained one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lrc_src.baselines import LRCMethod, StudentKD, TinyBERTStyle, hard_prune, student_like
from lrc_src.clone import LowRankClone
from lrc_src.config import ExperimentConfig
from lrc_src.export import student_config
from lrc_src.teachers import load_model_folder


def build_method(cfg: ExperimentConfig, teacher, train_blocks: np.ndarray | None) -> torch.nn.Module:
    """The method module for cfg.method (see lrc_src.baselines for what each one trains).

    train_blocks: [N, T], whose first batches calibrate the teacher-derived starts (lrc.init,
    prune_kd's pruning); None for a method whose trainable state is loaded from a checkpoint next
    (`train.load_run`): the same module, its start left undrawn, and no data needed."""
    b, d_S, seed = cfg.baseline, cfg.lrc.student_hidden_size, cfg.train.seed
    kd = dict(kl_temperature=b.kl_temperature, kl_reduction=b.kl_reduction)

    def calibration() -> torch.Tensor | None:  # the first calibration_batches training batches: [N, T]
        if train_blocks is None:
            return None
        n = b.calibration_batches * cfg.train.batch_size
        return torch.from_numpy(np.asarray(train_blocks[:n], dtype=np.int64))

    if b.init_from is not None:  # scratch, kd or prune_kd (the config refuses the others)
        student = start_from(b.init_from, teacher, d_S)
        return StudentKD(student, teacher if cfg.method != "scratch" and b.use_kl else None, **kd)
    if cfg.method == "lrc":
        torch.manual_seed(seed)
        clone = LowRankClone(teacher, cfg.lrc)
        if train_blocks is not None:
            clone.check_length(train_blocks.shape[1])  # here, before the trainer writes the run folder
            if cfg.lrc.init != "normal":
                clone.init_from_teacher(calibration())
        return LRCMethod(clone)
    if cfg.method == "scratch":
        return StudentKD(student_like(teacher, d_S, seed))
    if cfg.method == "kd":
        return StudentKD(student_like(teacher, d_S, seed), teacher if b.use_kl else None, **kd)
    if cfg.method == "tinybert":
        torch.manual_seed(seed)
        student = student_like(teacher, d_S, seed)
        return TinyBERTStyle(student, teacher, b.hidden_weight, b.attn_weight, use_kl=b.use_kl, **kd)
    if cfg.method == "prune_kd":  # LRC's start (lrc.init; "normal" means "prune"), exported, then KD
        init = "prune" if cfg.lrc.init == "normal" else cfg.lrc.init
        start = hard_prune(teacher, d_S, calibration(), init=init, untie_lm_head=cfg.lrc.untie_lm_head)
        return StudentKD(start, teacher if b.use_kl else None, **kd)
    if cfg.method == "sft":
        return StudentKD(teacher)  # for sft the "teacher" slot holds the model being fine-tuned
    raise AssertionError(cfg.method)


def start_from(folder: str, teacher, d_S: int):
    """The exported student in `folder` as the start of a plain student (baseline.init_from): loaded
    in fp32 exactly as saved, after checking it has the LRC student's shape for this teacher."""
    student = load_model_folder(folder)
    want = student_config(teacher.config, d_S)
    got = student.config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if getattr(got, key, None) != getattr(want, key, None):
            raise ValueError(
                f"baseline.init_from={folder!r} is not a student of this teacher at hidden size {d_S}: "
                f"{key} {getattr(got, key, None)!r}, expected {getattr(want, key, None)!r}"
            )
    return student


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
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], betas=tuple(tc.betas), weight_decay=tc.weight_decay, **ADAMW_KERNELS[kernel]
    )


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio * total steps, then linear decay to 0 (paper)."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f
