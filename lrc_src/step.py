"""One optimizer step of any method: the trainer's (lrc_src.train), which benchmarks/throughput.py
times as well.

With K micro-batches (ids_m [B, T], labels_m [B, T] or None) per step:

    with window():                                  LRC: the student's weights generated once
        for m in 1..K:
            loss_m, terms_m = method(ids_m, labels_m)     forward under autocast
            stop if loss_m is not finite
            backward(loss_m / K)                    gradients summed over the window
    [DDP with a window: all-reduce mean of the gradients, by hand]
    g = clip_grad_norm_(params, grad_clip); optimizer.step(); scheduler.step(); zero_grad(set_to_none)

The logged loss and every loss term are the means over the K micro-batches. `accelerator` is an
`accelerate.Accelerator` (autocast, backward, no_sync, clip_grad_norm_, reduce); the benchmark
passes a single-process one with the same mixed precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import DistributedType

# data-parallel types whose replicas hold whole parameters: the accumulation window's gradients
# can be averaged by hand (see accumulation_window)
DDP_TYPES = tuple(
    getattr(DistributedType, n)
    for n in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU")
    if hasattr(DistributedType, n)
)


class NonFiniteLossError(RuntimeError):
    """A micro-batch's loss is NaN or infinite; raised before its backward."""


def accumulation_window(method, grad_accum: int) -> Callable | None:
    """The method's accumulation window (`method.accumulation_window`, LRC: one weight generation
    per optimizer step) if a step of grad_accum micro-batches uses it, else None. Every process
    holds whole parameters (one process or DDP; the trainer refuses sharding launchers)."""
    window = getattr(method, "accumulation_window", None)
    return window if grad_accum > 1 else None


def average_gradients(params: list[torch.Tensor], accelerator) -> None:
    """Average p.grad over the processes (one all-reduce of a flat buffer), as DDP's sync would;
    a parameter without a gradient counts as zeros."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")  # [sum numel]
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def train_step(
    method,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    optimizer,
    params: list[torch.Tensor],
    grad_clip: float,
    accelerator,
    window: Callable | None = None,
    manual_sync: bool = False,
    scheduler=None,
    clock: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """One optimizer step of `method` over micro_batches (on its device); returns (the mean loss and
    loss terms over the micro-batches, the gradient norm before clipping).

    window: the context the micro-batches run in (`accumulation_window`; None: none).
    manual_sync: under DDP with a window, every micro-batch runs without DDP's gradient sync (its
        sync would miss the window's closing backward) and the gradients are averaged after it.
    scheduler: stepped after the optimizer (None: no schedule).
    clock: called with each part's name as the part ends, to time the parts (benchmarks/throughput.py
        --parts): "forward" and "backward" per micro-batch (the first forward in a window generates
        the weights), "window" after the window's closing backward and the gradient averaging,
        "optimizer" after clipping, the optimizer and scheduler steps and zero_grad.
    Under data parallelism the returned means are over every process's micro-batches.
    Raises NonFiniteLossError on a non-finite loss, before its backward and the optimizer step.
    """
    K = len(micro_batches)
    sums: dict[str, float] = {}
    clock = clock or (lambda part: None)
    with window() if window is not None else contextlib.nullcontext():
        for micro, (ids, labels) in enumerate(micro_batches):
            sync = micro == K - 1 and not manual_sync
            with accelerator.no_sync(method) if not sync else contextlib.nullcontext():
                with accelerator.autocast():
                    o = method(ids, labels)
                if not torch.isfinite(o.loss):
                    raise NonFiniteLossError(f"non-finite loss ({o.loss.item()})")
                clock("forward")
                accelerator.backward(o.loss / K)
            for k, v in [("loss", o.loss)] + list(o.losses.items()):
                sums[k] = sums.get(k, 0.0) + v.detach().float().item() / K
            clock("backward")
    if manual_sync:
        average_gradients(params, accelerator)
    if accelerator.num_processes > 1:  # the step's mean over every process's micro-batches
        sums = _mean_over_processes(sums, accelerator)
    clock("window")
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clock("optimizer")
    return sums, grad_norm


def _mean_over_processes(values: dict[str, float], accelerator) -> dict[str, float]:
    """Each value averaged over the processes (one all-reduce; every process has the same keys)."""
    flat = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    flat = accelerator.reduce(flat, reduction="mean")
    return dict(zip(values, flat.tolist()))
