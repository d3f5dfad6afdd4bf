"""How training and its benchmark run on a device: CPU threads, the glibc allocator
(`keep_freed_memory`), the mixed precision that 'auto' means on a device (`resolve_mixed_precision`)
and the process's accelerate state at that precision (`make_accelerator`), and whether and how the
decoder layers are compiled (`resolve_compile`, `compile_decoder_layers`), and what the process
runs on (`device_name`, `software`).

Threads and the allocator choose only how fast a run computes: the same values, bit for bit. Mixed
precision and compiling can change the numbers themselves (bf16 autocast; compiled kernels that
fuse and round differently), so 'auto' resolves them by device and the run records what it used.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel


def set_threads(n: int | None) -> None:
    """torch's CPU threads (None or 0: torch's default)."""
    if n:
        torch.set_num_threads(n)


def resolve_mixed_precision(choice: str, device_type: str | None = None) -> str:
    """'auto' -> 'bf16' where the device computes bf16 natively: a CUDA GPU with bf16, or a CPU with
    avx512_bf16/amx; else 'no'. Any other choice is returned as it is.

    device_type: "cuda" or "cpu" (default: CUDA when it is available, as the trainer runs).
    """
    if choice != "auto":
        return choice
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def make_accelerator(mixed_precision: str, **kwargs) -> Accelerator:
    """An `accelerate.Accelerator` at mixed_precision ('auto' resolved by `resolve_mixed_precision`).

    accelerate keeps one state per process and refuses a second precision in it. Without a launcher
    (WORLD_SIZE unset or 1) the run that set it has finished, so the state is renewed: a notebook
    may train in fp32, then in bf16. Under a launcher it stays, as every process set it alike.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # the precision only; the process's device state stays
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), **kwargs)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (<malloc.h>)


# On the CPU, train.compile=auto compiles runs of at least this many optimizer steps. A cold compile
# of LRC's layers costs ~13 s at the tiny shape and saves 10-13% of a step (0.2-0.3 s of a 2.3-s
# step of 1,024 tokens, about 1 s of an 8-s step of 4,096; benchmarks/README.md), so it pays for
# itself within a few dozen steps. The threshold is set well above that so that the CPU profiles
# (30-120 steps per run) stay eager: compiled layers round differently, and those profiles'
# committed results (results/<profile>/) are eager runs, which a rerun must reproduce.
CPU_COMPILE_MIN_STEPS = 1000


def resolve_compile(choice: bool | str, device_type: str, total_steps: int, compilable: bool = True) -> bool:
    """train.compile -> whether to compile the decoder layers. 'on'/True compiles (a method that
    cannot compile then says so); 'auto' compiles compilable methods on CUDA, and on the CPU from
    CPU_COMPILE_MIN_STEPS steps; on other devices (unmeasured) only when asked."""
    if choice in (True, "on"):
        return True
    if choice in (False, "off"):
        return False
    assert choice == "auto", choice
    return compilable and (device_type == "cuda" or (device_type == "cpu" and total_steps >= CPU_COMPILE_MIN_STEPS))


# torch.compile options of every compiled layer (`compile_decoder_layers`, LowRankClone.compile_layers):
# training shapes are fixed, and a new shape (or a teacher's and a student's layers sharing one code
# object) gets its own static graph
COMPILE_DEFAULTS = {"dynamic": False}


def compile_decoder_layers(model: PreTrainedModel | None, **options) -> None:
    """torch.compile each decoder layer of an HF causal LM in place (regional compilation: the
    layers share one compiled graph); None does nothing. options: passed to torch.compile, over
    COMPILE_DEFAULTS: static shapes, so that a teacher's and a student's layers (one
    code object, two hidden sizes) each get a graph for their own shapes instead of one graph for
    dynamic shapes."""
    if model is not None:
        for layer in model.model.layers:
            layer.compile(**{**COMPILE_DEFAULTS, **options})


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
    stays at its peak. (A 2 GB trim threshold would still trim a free top above 2 GB: strace shows a
    freed 2.1 GB tensor given back and faulted in again on the next allocation. LRC's working set at
    batch 16 x 256 is 6 GB.)
    Nothing else changes (same values, bit for bit). Returns whether it was applied: glibc only.
    """
    libc = glibc()
    if libc is None:
        return False
    # mallopt's int -1 becomes glibc's size_t trim threshold SIZE_MAX: the heap is never trimmed
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def trim_heap() -> None:
    """glibc: give the heap's free memory back to the OS now (malloc_trim), e.g. before measuring
    a step's resident-memory growth where freed memory is otherwise kept."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def device_name(device_type: str) -> str:
    """The device a process computes on: the current CUDA card's name, or the CPU's model with the
    machine's count of logical CPUs (bf16 on one CPU model rounds differently from another's)."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return (m.group(1).strip() if m else platform.processor() or "cpu") + f" ({os.cpu_count()} cores visible)"


def software(device_type: str) -> dict[str, str]:
    """The versions a run's numbers depend on, and its device: what a run folder records, so that a
    result can be traced to the stack that made it (`make venv` installs constraints.txt's)."""
    import accelerate
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "device": device_name(device_type),
        "platform": f"{platform.system()} {platform.machine()}",
    }
