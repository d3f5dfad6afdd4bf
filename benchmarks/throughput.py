#!/usr/bin/env python
"""Training throughput of LRC and every baseline, the paper's Table 8, measured in one process.

For one profile (teacher + student shapes), every method that `lrc_src.factory.build_method`
builds is timed on the same random token batches (fixed seed):

    lrc        LowRankClone, the profile's settings (default: attn/ffn projections "all")
    lrc_io     the same with attn_projection=io and ffn_projection=io
    scratch    ordinary training of the student (LM loss only; the trainer's code, whose LM head and
               loss are the same fused, position-chunked `losses.head_losses` as every method's)
    kd         random student, KL + LM against the teacher
    tinybert   random student, KL + LM + hidden-state and attention-map MSE
    prune_kd   hard-pruned teacher, KL + LM
    bound      the teacher's forward (inference mode) + one `scratch` step on the same batch: what
               LRC costs at least, since it must run the teacher and train a student of this shape
    lrc_regen  (only with --grad-accum > 1) lrc generating the student's weights for every
               micro-batch (no accumulation window): lrc's step beside it shows what generating
               them once per optimizer step saves

With --grad-accum K a timed step is K micro-batches (forward + backward each, loss / K) and one
optimizer step, for every method; the bound runs the teacher's forward and the student's
forward/backward K times. LRC then generates its weights once per step (the trainer does the same,
`lrc_src.step.accumulation_window`), so its fixed per-step cost is shared by K micro-batches.

A timed step is the trainer's own optimizer step, `lrc_src.step.train_step`: per micro-batch the
forward under autocast (a single-process accelerate.Accelerator with the run's mixed precision),
the non-finite-loss check, the backward and the loss terms read back; then clip_grad_norm_ (1.0),
the AdamW step (fused on CUDA, as the trainer; --adamw) and zero_grad(set_to_none=True); no
learning-rate schedule; on CUDA followed by a synchronize. Methods alternate round-robin (the
start rotates every round) so that machine drift affects all alike; the warm-up rounds are dropped
and the median of the timed steps is reported. `--schedule sequential` (default for paper-1.5b,
whose five 1.6B-parameter students with their AdamW states do not fit one GPU together) builds,
times and frees one method at a time (scratch and bound alternate).

Profiles:
    ci          config/ci.yaml: the micro random Llama teacher (d_T 64) -> d_S 32, batch 4 x 64
    tiny        config/tiny.yaml: SmolLM2-135M-Instruct (d_T 576) -> d_S 288, batch 4 x 256
    paper-1.5b  config/paper-lrc-1.5b.yaml with a Llama-3.2-3B-shaped teacher of RANDOM weights
                built in bf16 on the GPU (hidden 3072, 28 layers, 24/8 heads, head_dim 128, FFN
                8192, vocab 128256, tied, llama3 RoPE) -> d_S 1536, seq 2048; --device cuda only.
                Default batch 1 per GPU (the paper used 3 per GPU with ZeRO-2 sharding over 8).

Memory (peak_mem_mb): the largest growth of memory during one step of the method over what
was held just before it, i.e. the step's working memory (activations, generated weights,
gradients); the method's persistent state (trainable parameters + AdamW moments) is in state_mb,
and the whole process's peak during the step (teacher, every live method) in peak_total_mb.
    CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
          memory_allocated() before the step; every timed step.
    CPU:  VmHWM (peak RSS; reset through /proc/self/clear_refs) minus VmRSS before the step, in
          one extra untimed step per method after the timed ones, with the heap's free memory
          first given back to the OS (glibc malloc_trim): the timed steps reuse the memory that
          earlier steps freed (below), which RSS growth would not see.

CPU allocator (column freed_memory): as the trainer does (`lrc_src.runtime.keep_freed_memory`), the
process keeps the memory that tensors free for the next step instead of returning it to the OS,
which glibc otherwise does for every large block, so each step page-faults its whole working set
anew ("kept"); --return-freed-memory times glibc's default ("returned").

Model FLOPs and MFU (columns flops_per_step, mfu). With N = B*T tokens per step, L layers,
nH query heads of size hd, and P_X = the parameters of model X's matrix multiplications (every
q/k/v/o/gate/up/down weight of every layer + the V x d LM head; embeddings lookups and norms are
not counted):

    A_fwd  = 2 * B * L * T^2 * nH * hd           (QK^T and AV, 4*T^2*nH*hd per layer, halved by
                                                  the causal mask; same nH, hd for teacher and student)
    train(S)   = 6 * N * P_S + 3 * A_fwd          (student forward + backward)
    forward(T) = 2 * N * P_T + A_fwd              (teacher forward)

    lrc, lrc_io           = train(S) + forward(T)
    scratch               = train(S)
    kd, prune_kd, bound   = train(S) + forward(T)
    tinybert              = train(S) + forward(T) + 6 * N * (L+1) * d_S * d_T  (hidden maps)

LRC's own overheads (generating the student's weights from the teacher's, 3 * 2 * d_S * P_T per
step; the clone-loss targets o^T P_o, f^T P_down; the MSEs, softmaxes and norms) are NOT model
FLOPs: they show up as a lower MFU. mfu = flops_per_step / median_step_s / peak_flops, where
peak_flops is, on CUDA, the dense bf16 (or fp32 without mixed precision) tensor-core peak of the
device taken from a table by device name (e.g. H100 SXM / H200 989e12 bf16), and on the CPU (or an
unknown GPU) MEASURED in the same process: the best of repeated 2048 x 2048 matmuls in the
compute dtype with the same thread count (column peak_flops_source says which).

The 1-minute load average at the start and end of the timing (column load_avg) says whether
other processes competed for the CPU. min_step_s / max_step_s give the spread of the timed steps;
minor_faults_per_step and sys_s_per_step (medians over the timed steps, from getrusage: the whole
process, CPU and GPU runs alike) show whether a slow run was still page-faulting its working set.

Compilation (--compile, column compiled): every method's decoder layers go through torch.compile
(`compile_layers()`, as `lrc train --compile`), and so do the shared teacher's for the bound; so
does the fused head's per-chunk softmax / KL / gradient work where --compile-head says (auto: on
CUDA, as the trainer; column compiled_head); tinybert stays eager (transformers' capture of its
hidden states and attention maps breaks the graph in every layer, and would add recompiles to the
decoder-layer code the other HF methods share). The first warm-up step of each method compiles
it; first_step_s records that step (every run), so the cost of compiling is on record beside the
steps it speeds up. `--compile both` times every
method twice in the same rounds, eagerly and compiled: one module and one optimizer per method, its
eager twin running the compiled code's original Python under torch.compiler.set_stance("force_eager")
(so does its bound, through the compiled teacher). A compiled row's over_eager_paired_median/_min/_max
is its step over its eager twin's step of the same round: what compiling gains, measured in one
process and round so that the machine's drift between processes does not touch it. Each method's
compiled row pairs with the compiled bound, its eager row with the eager bound, and the last line
reports the compiled ones.

Paired ratios (columns over_bound_paired_median/_min/_max, round-robin schedule only): every round
times each method once, so the method's step divided by the bound's step of the same round is a
ratio that the machine's drift between rounds hardly moves; their median and range over the timed
rounds show how far one run's lrc_over_bound (a ratio of two medians) can be trusted.

Parts (--parts): `train_step` marks the end of each part of the step (on CUDA after a
synchronize; the step already waits for each micro-batch's loss, so this adds about one wait per
step): every micro-batch's forward (under LRC's window the first one generates the weights) and
backward, the window's closing backward, and the optimizer (clip, AdamW, zero_grad). Each timed step
becomes a row of <output stem>_parts.csv; per_micro_batch_s is a later forward + a backward, and
fixed_s is the rest of the step (the weight generation, the closing backward, the optimizer). The
summary splits LRC's step over the bound's into K x its extra per micro-batch and its extra once
per step, beside what LRC's extra matmuls (the clone targets per micro-batch, the weight generation
per step) would take at the bound's FLOP rate: whichever part exceeds its floor is where LRC loses
time.

Output: a tidy CSV (default results/<profile>/tables/table8_throughput.csv, written atomically),
a readable table, and as the LAST line of stdout:

    lrc_over_bound=<LRC step s / bound step s> lrc_over_ordinary=<LRC tokens/s / scratch tokens/s>
    lrc_tokens_per_s=<n> mfu=<LRC mfu>

Examples:
    python benchmarks/throughput.py --profile ci --steps 2 --warmup 1
    python benchmarks/throughput.py --profile tiny --threads 2 --steps 5 --warmup 2
    python benchmarks/throughput.py --profile paper-1.5b --device cuda --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    "ci": ROOT / "config" / "ci.yaml",
    "tiny": ROOT / "config" / "tiny.yaml",
    "paper-1.5b": ROOT / "config" / "paper-lrc-1.5b.yaml",
}
CUDA_ONLY_PROFILES = ("paper-1.5b",)
PROFILE_DEFAULT_BATCH = {"paper-1.5b": 1}  # one H100/H200 without ZeRO sharding
# name -> (build_method's method, config overrides)
METHODS = {
    "lrc": ("lrc", []),
    "lrc_io": ("lrc", ["lrc.attn_projection=io", "lrc.ffn_projection=io"]),
    "scratch": ("scratch", []),
    "kd": ("kd", []),
    "tinybert": ("tinybert", []),
    "prune_kd": ("prune_kd", []),
    "lrc_regen": ("lrc", []),  # with --grad-accum > 1 only: no accumulation window
}
ACCUM_ONLY = ("lrc_regen",)
BOUND = "bound"
COLUMNS = [
    "profile",
    "device",
    "device_name",
    "method",
    "batch_size",
    "seq_len",
    "tokens_per_step",
    "median_step_s",
    "tokens_per_s",
    "peak_mem_mb",
    "threads",
    "dtype",
    # extra context
    "peak_total_mb",
    "state_mb",
    "flops_per_step",
    "mfu",
    "peak_flops",
    "peak_flops_source",
    "schedule",
    "timed_steps",
    "load_avg",
    "status",
    "grad_accum",
    "freed_memory",
    "min_step_s",
    "max_step_s",
    "minor_faults_per_step",
    "sys_s_per_step",
    "over_bound_paired_median",
    "over_bound_paired_min",
    "over_bound_paired_max",
    "adamw",
    "compiled",
    "first_step_s",
    "over_eager_paired_median",
    "over_eager_paired_min",
    "over_eager_paired_max",
    "compiled_head",
]
# Dense tensor-core peaks (FLOP/s) by device-name substring; the first match wins, so longer or
# more specific names come first ("H100 PCIe" before "H100", "A100" before "A10").
CUDA_PEAK_FLOPS = [
    # name, bf16, fp32 (TF32 tensor cores)
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 494e12),  # SXM
    ("H800", 989e12, 494e12),
    ("H20", 148e12, 74e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62e12),
]


def paper_teacher_config():
    """A Llama-3.2-3B(-Instruct)-shaped config (3.21B parameters, tied embeddings, llama3 RoPE)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128009,
    )


# ---------------------------------------------------------------- FLOPs and device peaks


def matmul_params(tcfg, hidden: int) -> int:
    """P_X: parameters in the matmuls of a model of tcfg's shape with hidden size `hidden` (layers + LM head)."""
    from lrc_src.export import head_dim

    hd = head_dim(tcfg)
    q, kv = tcfg.num_attention_heads * hd, tcfg.num_key_value_heads * hd
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * tcfg.intermediate_size
    return tcfg.num_hidden_layers * per_layer + tcfg.vocab_size * hidden


def model_flops(method: str, tcfg, d_S: int, batch: int, seq: int) -> float:
    """Model FLOPs of one training step of `method` (formula in the module docstring)."""
    from lrc_src.export import head_dim

    n = batch * seq
    hd = head_dim(tcfg)
    L, d_T = tcfg.num_hidden_layers, tcfg.hidden_size
    attn_fwd = 2.0 * batch * L * seq**2 * tcfg.num_attention_heads * hd
    train_student = 6.0 * n * matmul_params(tcfg, d_S) + 3 * attn_fwd
    teacher_fwd = 2.0 * n * matmul_params(tcfg, d_T) + attn_fwd
    if method == "scratch":
        return train_student
    if method == "tinybert":
        return train_student + teacher_fwd + 6.0 * n * (L + 1) * d_S * d_T
    return train_student + teacher_fwd  # lrc, lrc_io, kd, prune_kd, bound


def lrc_extra_flops(tcfg, d_S: int, batch: int, seq: int, generation: bool = True) -> float:
    """FLOPs LRC adds to the bound's work in matmuls alone (default variant, targets not detached):
    weight generation W_T P, forward + dP backward, 4 * d_T * P_S per step (generation=False: left
    out, as if amortised over unboundedly many tokens); the targets o^T P_o and f^T P_down with
    their P backward, 8 * N * d_T * d_S per layer."""
    d_T, L = tcfg.hidden_size, tcfg.num_hidden_layers
    gen = 4.0 * d_T * matmul_params(tcfg, d_S) if generation else 0.0
    return gen + 8.0 * batch * seq * d_T * d_S * L


def cuda_peak_flops(device_name: str, bf16: bool) -> float | None:
    for name, p_bf16, p_fp32 in CUDA_PEAK_FLOPS:
        if name.lower() in device_name.lower():
            return p_bf16 if bf16 else p_fp32
    return None


def measure_peak_flops(torch, device, dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul in `dtype` on `device` (this process's threads)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= 2:
            best = min(best, dt)
    return 2.0 * n**3 / best


# ---------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class MemoryMeter:
    """Per-step working memory: CUDA allocator peaks, or the CPU peak RSS (VmHWM) growth."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.can_reset = False
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS (VmHWM)
                self.can_reset = _proc_status_kb("VmHWM") is not None
            except OSError:
                pass

    def start(self) -> float:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return float(self.torch.cuda.memory_allocated())
        if self.can_reset:
            Path("/proc/self/clear_refs").write_text("5")
            return 1024.0 * (_proc_status_kb("VmRSS") or 0)
        import resource  # no reset: peak RSS since start, so only growth beyond earlier peaks shows

        return 1024.0 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self, before: float) -> tuple[float, float]:
        """(bytes above `before` at the step's peak, the process's peak bytes)."""
        if self.cuda:
            peak = float(self.torch.cuda.max_memory_allocated())
        elif self.can_reset:
            peak = 1024.0 * (_proc_status_kb("VmHWM") or 0)
        else:
            import resource

            peak = 1024.0 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0.0, peak - before), peak


def _usage() -> tuple[float, float]:
    """(minor page faults, system CPU seconds) of this process so far; NaNs without `resource`."""
    try:
        import resource
    except ImportError:  # not a Unix
        return float("nan"), float("nan")
    u = resource.getrusage(resource.RUSAGE_SELF)
    return float(u.ru_minflt), u.ru_stime


# ---------------------------------------------------------------- methods


@dataclass
class Unit:
    """One timed workload: a method (or the bound) with its optimizer and per-step records."""

    name: str
    module: object = None
    optimizer: object = None
    params: list = field(default_factory=list)
    compiled: bool = False  # its decoder layers through torch.compile (--compile; tinybert cannot be)
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per timed step
    sys_s: list[float] = field(default_factory=list)  # system CPU seconds per timed step
    peak_bytes: float = 0.0
    peak_total_bytes: float = 0.0
    first_step_s: float = float("nan")  # the first (warm-up) step: with --compile, its compilation
    state_bytes: float = 0.0
    status: str = "ok"
    label: str = ""  # how the unit is printed and named in files (default: its name)
    parts: list[dict] = field(default_factory=list)  # --parts: step_parts() of every timed step
    last_parts: dict | None = None  # step_parts() of the latest step

    def __post_init__(self):
        self.label = self.label or self.name

    def eager_twin(self) -> Unit:
        """The same module and optimizer, run eagerly (`--compile both`)."""
        return Unit(self.name, self.module, self.optimizer, self.params, compiled=False)


def build_unit(name, bench: Bench):
    """Build method `name` as the trainer would (lrc_src.factory.build_method) + its AdamW
    (lrc_src.factory.make_optimizer with kernel --adamw); with --compile its decoder layers go
    through torch.compile (the method's `compile_layers`, as `lrc train --compile`; not tinybert's)."""
    import torch

    from lrc_src.factory import build_method, make_optimizer

    method, overrides = METHODS[name]
    cfg = bench.cfg_for(method, overrides)
    teacher, compiled = bench.teacher, bench.compiling
    torch.manual_seed(cfg.train.seed)
    with torch.device(bench.device):  # teacher-derived starts move their calibration ids to the teacher's device
        module = build_method(cfg, teacher, bench.calib_blocks).to(bench.device)
    if compiled:
        try:
            module.compile_layers(head=bench.compile_head)
        except ValueError:  # a method that cannot be compiled says so (tinybert): it runs eagerly
            compiled = False
    unit = Unit(name, module, compiled=compiled)
    params = module.trainable_named_parameters()
    unit.optimizer = make_optimizer(params, cfg.train, kernel=bench.adamw)
    unit.params = [p for _, p in params]
    module.train()
    return unit


def state_bytes(unit) -> float:
    """Trainable parameters + AdamW moments of a unit (after its first step)."""
    total = sum(p.numel() * p.element_size() for p in unit.params)
    for st in unit.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel") and v.ndim > 0)
    return float(total)


def bound_method(teacher, scratch_module):
    """The bound as a method: the teacher's forward in inference mode (its logits discarded), then
    the scratch method's forward on the same batch, whose loss the step trains."""
    import torch

    def forward(ids, labels=None):
        with torch.inference_mode():
            _ = teacher(input_ids=ids, use_cache=False).logits  # [B, T, V], discarded
        return scratch_module(ids, labels)

    return forward


def run_step(unit, scratch, bench: Bench, micro_batches) -> float:
    """One timed optimizer step of `unit` over micro_batches (a list of ids [B, T] on the device):
    the trainer's `lrc_src.step.train_step`; returns seconds. The bound steps its scratch unit;
    lrc_regen opens no accumulation window."""
    import torch

    from lrc_src.step import accumulation_window, train_step

    target = scratch if unit.name == BOUND else unit
    method = bound_method(bench.teacher, target.module) if unit.name == BOUND else target.module
    window = None if unit.name in ACCUM_ONLY else accumulation_window(target.module, len(micro_batches))
    # a unit that is not compiled runs eagerly even through the shared teacher's compiled layers
    stance = contextlib.nullcontext() if target.compiled else torch.compiler.set_stance("force_eager")
    marks: list[tuple[str, float]] = []
    cuda = bench.device.type == "cuda"

    def clock(part: str) -> None:  # --parts: when each part of the step ends
        if cuda:
            torch.cuda.synchronize()
        marks.append((part, time.perf_counter()))

    t0 = time.perf_counter()
    with stance:
        train_step(
            method,
            [(ids, None) for ids in micro_batches],
            target.optimizer,
            target.params,
            bench.base.train.grad_clip,
            bench.accelerator,
            window,
            clock=clock if bench.args.parts else None,
        )
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    unit.last_parts = step_parts(t0, marks, len(micro_batches)) if bench.args.parts else None
    return dt


def step_parts(t0: float, marks: list[tuple[str, float]], K: int) -> dict[str, float]:
    """One step's parts (seconds) from `train_step`'s clock marks (part, time) after t0:
    forward_first_s (with LRC's window: the weight generation too), forward_s (the mean of the later
    forwards; K = 1: the first), backward_s (the mean per micro-batch), window_s (closing backward of
    the window), optimizer_s (clip, AdamW, zero_grad); per_micro_batch_s = forward_s + backward_s and
    fixed_s = the step - K * per_micro_batch_s, the work done once per step whatever K is."""
    spans: dict[str, list[float]] = {}
    prev = t0
    for part, t in marks:
        spans.setdefault(part, []).append(t - prev)
        prev = t
    fwd, bwd = spans["forward"], spans["backward"]
    assert len(fwd) == len(bwd) == K and len(spans["window"]) == len(spans["optimizer"]) == 1, spans
    later = statistics.fmean(fwd[1:]) if K > 1 else fwd[0]
    per_micro = later + statistics.fmean(bwd)
    step = prev - t0
    return {
        "step_s": step,
        "forward_first_s": fwd[0],
        "forward_s": later,
        "backward_s": statistics.fmean(bwd),
        "window_s": spans["window"][0],
        "optimizer_s": spans["optimizer"][0],
        "per_micro_batch_s": per_micro,
        "fixed_s": step - K * per_micro,
    }


def profile_step(unit, scratch, bench: Bench, micro_batches, path: Path) -> None:
    """One more (untimed) step of `unit` under torch.profiler; its 40 costliest operators by self
    time (device time on CUDA, CPU time otherwise) written to `path` as text."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        dt = run_step(unit, scratch, bench, micro_batches)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {unit.name}: one step under torch.profiler, {dt:.4f} s with the profiler's "
        f"overhead; operators by {key}\n{table}\n"
    )


# ---------------------------------------------------------------- CLI


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="benchmarks/throughput.py",
        description=(
            "Time one training step (forward, backward, clip, AdamW step, zero_grad) of LRC, LRC with IO "
            "projections, scratch, KD, TinyBERT-style and prune+KD training, and the bound (teacher "
            "forward + one ordinary student step), on the same teacher, student shapes and random "
            "batches, in one process; write tokens/s, median step seconds, peak memory and MFU to a CSV "
            "(the paper's Table 8). The last stdout line is 'lrc_over_bound=R lrc_over_ordinary=R "
            "lrc_tokens_per_s=N mfu=F'. See the module docstring for the memory and FLOP definitions."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "profiles:\n"
            "  ci          config/ci.yaml: micro random Llama teacher (d_T 64) -> d_S 32, batch 4 x 64\n"
            "  tiny        config/tiny.yaml: SmolLM2-135M-Instruct (576) -> d_S 288, batch 4 x 256\n"
            "  paper-1.5b  Llama-3.2-3B-shaped teacher with random bf16 weights built on the GPU -> d_S 1536,\n"
            "              seq 2048, batch 1 (config/paper-lrc-1.5b.yaml); needs --device cuda\n"
            "examples:\n"
            "  python benchmarks/throughput.py --profile ci --steps 2 --warmup 1\n"
            "  python benchmarks/throughput.py --profile tiny --threads 2\n"
            "  python benchmarks/throughput.py --profile paper-1.5b --device cuda --steps 5 --warmup 2\n"
        ),
    )
    p.add_argument("--profile", required=True, metavar="NAME", help=f"one of {', '.join(PROFILES)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per method first (default 2)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="sequences per step (default: the profile's train.batch_size; paper-1.5b: 1)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="T",
        help="tokens per sequence (default: the profile's data.seq_len)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (default 1); K > 1 also times lrc_regen",
    )
    p.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's default)"
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="CSV",
        help="CSV to write (default results/<profile>/tables/table8_throughput.csv)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join([*METHODS, BOUND])} (default: all; "
        "lrc_regen only with --grad-accum > 1)",
    )
    p.add_argument(
        "--schedule",
        default="auto",
        choices=("auto", "round-robin", "sequential"),
        help="round-robin: all methods alive, alternating every step (drift hits all alike); "
        "sequential: one method at a time, freed after (for memory). auto: sequential for "
        "paper-1.5b, round-robin otherwise",
    )
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=("auto", "bf16", "no"),
        help="autocast dtype; auto = lrc_src.runtime.resolve_mixed_precision('auto') for the device",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random token batches (default 0)")
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="CPU: time glibc's default allocator behaviour (freed memory goes back to the OS) "
        "instead of the trainer's (kept for the next step; lrc_src.runtime.keep_freed_memory)",
    )
    p.add_argument(
        "--adamw",
        default="auto",
        choices=("auto", "fused", "foreach", "default"),
        help="AdamW kernel: fused (one launch for all tensors), foreach, or default (PyTorch's "
        "choice: foreach on CUDA, one tensor at a time on the CPU); auto = as the trainer: "
        "fused on CUDA, default on the CPU",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="off",
        choices=("off", "on", "both"),
        help="torch.compile every method's decoder layers (regional: one graph for all layers; "
        "the bound's teacher forward too; tinybert stays eager), as `lrc train --compile`; "
        "compilation happens in the warm-up steps, so use --warmup >= 1. '--compile both' "
        "times every method eagerly and compiled in the same rounds (paired before/after)",
    )
    p.add_argument(
        "--compile-head",
        default="auto",
        choices=("auto", "on", "off"),
        help="with --compile: compile the fused head's per-chunk softmax / KL / gradient work too "
        "(compile_layers(head=...)); auto = as the trainer: on CUDA only",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="also time the parts of every timed step (forwards, backwards, the accumulation window's "
        "closing backward, the optimizer; on CUDA a synchronize ends each part) and write them to "
        "<output stem>_parts.csv; the summary splits LRC's step over the bound's into work per "
        "micro-batch and work once per step, each beside its FLOP floor",
    )
    p.add_argument(
        "--torch-profiler",
        default=None,
        metavar="DIR",
        help="after the timed steps, run one more step of each method under torch.profiler and "
        "write its costliest operators to DIR/<method>.txt (not timed)",
    )
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"throughput.py: error: {msg}", file=sys.stderr)
    return 2


def check_args(args) -> str | None:
    """The first problem with the command line, or None; fills in the default --methods."""
    if args.profile not in PROFILES:
        return f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}"
    if args.methods is None:
        args.methods = ",".join(m for m in [*METHODS, BOUND] if m not in ACCUM_ONLY or args.grad_accum > 1)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS and m != BOUND]
    if bad or not names:
        return f"unknown method(s) {bad}; choose from {', '.join([*METHODS, BOUND])}"
    for opt in ("steps", "batch_size", "seq_len", "threads", "grad_accum"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            return f"--{opt.replace('_', '-')} must be > 0, got {v}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    accum_only = [m for m in names if m in ACCUM_ONLY]
    if accum_only and args.grad_accum == 1:
        return f"{accum_only} need --grad-accum > 1 (with one micro-batch every method generates once per step)"
    if args.parts and args.grad_accum == 1:
        return "--parts needs --grad-accum > 1: it solves for the work per micro-batch and once per step"
    if args.compile != "off" and args.warmup < 1:
        return "--compile needs --warmup >= 1: the first step of each method compiles it"
    return None


# ---------------------------------------------------------------- setup


@dataclass
class Bench:
    """One run of the benchmark: its settings (command line + profile) and what every method shares
    (teacher, random batches, the accelerator that autocasts their steps)."""

    args: argparse.Namespace
    wanted: list[str]  # the methods asked for, in order, each once
    device: object  # torch.device
    base: object  # the profile's ExperimentConfig
    B: int  # sequences per micro-batch
    T: int  # tokens per sequence
    K: int  # micro-batches per optimizer step
    mp: str  # mixed precision: "bf16" or "no"
    adamw: str  # AdamW kernel
    kept: bool  # freed memory kept for the next step (keep_freed_memory applied)
    schedule: str  # "round-robin" or "sequential"
    accelerator: object = None
    teacher: object = None
    batches: list = field(default_factory=list)  # per round: K random ids [B, T] (CPU)
    calib_blocks: object = None  # [calibration_batches * B, T] random ids for teacher-derived starts

    @property
    def compiling(self) -> bool:  # on, or both (eager twins beside the compiled units)
        return self.args.compile != "off"

    @property
    def both(self) -> bool:
        return self.args.compile == "both"

    @property
    def compile_head(self) -> bool:  # --compile-head; auto: as compile_layers (lrc_src.losses.compiles_head)
        from lrc_src.losses import compiles_head

        return compiles_head(self.device, {"on": True, "off": False}.get(self.args.compile_head))

    @property
    def rounds(self) -> int:
        return self.args.warmup + self.args.steps

    @property
    def dtype_name(self) -> str:
        return "bf16-autocast" if self.mp == "bf16" else "fp32"

    def cfg_for(self, method: str, overrides: list[str]):
        from lrc_src.config import load_config

        return load_config(
            PROFILES[self.args.profile],
            [f"method={method}", f"train.batch_size={self.B}", f"data.seq_len={self.T}", *overrides],
        )


def setup(args) -> Bench | str:
    """The benchmark's settings and runtime (threads, allocator, precision), or an error message."""
    import torch
    from accelerate import Accelerator

    from lrc_src.config import load_config
    from lrc_src.runtime import keep_freed_memory, resolve_mixed_precision, set_threads

    if args.device == "cuda" and not torch.cuda.is_available():
        return f"--device cuda but no CUDA device is available (torch {torch.__version__})"
    if args.profile in CUDA_ONLY_PROFILES and args.device != "cuda":
        return f"profile {args.profile} (a 3B teacher at seq 2048) runs only with --device cuda"
    device = torch.device(args.device)
    base = load_config(PROFILES[args.profile])
    set_threads(args.threads)
    kept = device.type == "cpu" and not args.return_freed_memory and keep_freed_memory()  # as the trainer
    mp = resolve_mixed_precision(args.mixed_precision, device.type)
    adamw = args.adamw if args.adamw != "auto" else ("fused" if device.type == "cuda" else "default")  # as the trainer
    schedule = (
        args.schedule if args.schedule != "auto" else ("sequential" if args.profile == "paper-1.5b" else "round-robin")
    )
    bench = Bench(
        args,
        list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip())),
        device,
        base,
        B=args.batch_size or PROFILE_DEFAULT_BATCH.get(args.profile) or base.train.batch_size,
        T=args.seq_len or base.data.seq_len,
        K=args.grad_accum,
        mp=mp,
        adamw=adamw,
        kept=kept,
        schedule=schedule,
    )
    bench.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
    return bench


def load_bench_teacher(bench: Bench) -> str | None:
    """bench.teacher (with --compile its decoder layers compiled), the random batches (one list of
    K micro-batches per round, shared by every method of the round) and calibration blocks; or an
    error message."""
    import numpy as np
    import torch

    base, device = bench.base, bench.device
    if bench.args.profile == "paper-1.5b":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(base.train.seed)
        with torch.device(device):  # random weights, built directly in bf16 on the GPU
            teacher = AutoModelForCausalLM.from_config(paper_teacher_config(), dtype=torch.bfloat16)
        teacher.eval().requires_grad_(False)
    else:
        from lrc_src.teachers import load_teacher

        try:
            teacher, _ = load_teacher(base.teacher)
        except (FileNotFoundError, ValueError) as e:
            return f"cannot load teacher {base.teacher!r}: {e}"
        teacher = teacher.to(device)
    if bench.compiling:  # the bound's teacher forward (kd's and prune_kd's too: one shared teacher)
        from lrc_src.runtime import compile_decoder_layers

        compile_decoder_layers(teacher)
    bench.teacher = teacher
    vocab = int(teacher.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(bench.args.seed)
    bench.batches = [
        [torch.randint(0, vocab, (bench.B, bench.T), generator=gen) for _ in range(bench.K)]
        for _ in range(bench.rounds)
    ]
    bench.calib_blocks = np.random.default_rng(bench.args.seed).integers(
        0, vocab, (base.baseline.calibration_batches * bench.B, bench.T)
    )
    return None


def method_groups(bench: Bench) -> list[list[str]]:
    """The methods to build (scratch too for the bound, which trains through it), in groups that
    are alive together: one group (round-robin), or one method per group (sequential)."""
    to_build = [m for m in METHODS if m in bench.wanted or (m == "scratch" and BOUND in bench.wanted)]
    if bench.schedule == "round-robin":
        return [to_build]
    groups = [[m] for m in to_build if m != "scratch"]
    if "scratch" in to_build:
        groups.insert(to_build.index("scratch"), ["scratch"])
    return groups


# ---------------------------------------------------------------- timing


def build_group(bench: Bench, group: list[str], results: dict, bar) -> tuple[list[Unit], dict[bool, Unit]]:
    """The group's units (with --compile both each compiled one after its eager twin; the bound
    after the scratch unit it trains through) and its scratch units by `compiled`. A method whose
    build runs out of memory goes to `results` with status "oom (build)"."""
    import torch

    units: list[Unit] = []
    for name in group:
        bar.set_postfix_str(f"building {name}")
        try:
            unit = build_unit(name, bench)
        except torch.OutOfMemoryError:
            results[name, bench.compiling] = Unit(name, status="oom (build)", compiled=bench.compiling)
            unit = None
        _release_cached(torch, bench.device)  # after the except block: its traceback held the tensors
        if unit is None:
            continue
        if bench.both and unit.compiled:  # the eager twin first: it never runs the compiler
            units.append(unit.eager_twin())
            unit.label = f"{name}_compiled"
        elif bench.both and name in bench.wanted:  # a method that refuses to compile is timed once
            bar.total -= bench.rounds + _memory_round(bench)
        units.append(unit)
    scratches = {u.compiled: u for u in units if u.name == "scratch"}  # the bound trains through its own
    if BOUND in bench.wanted:
        for sc in scratches.values():
            units.append(Unit(BOUND, compiled=sc.compiled, label=BOUND + sc.label.removeprefix("scratch")))
        if "scratch" in group and not scratches:
            results[BOUND, bench.compiling] = Unit(BOUND, status="oom (build)", compiled=bench.compiling)
    return units, scratches


def _memory_round(bench: Bench) -> int:
    """1 on the CPU: working memory comes from one extra untimed step per method (docstring)."""
    return int(bench.device.type == "cpu")


def time_rounds(bench: Bench, units: list[Unit], scratches: dict[bool, Unit], meter: MemoryMeter, bar) -> None:
    """Every wanted unit steps once per round, the start rotating every round; warm-up rounds first,
    then the timed ones, then (CPU) the memory round."""
    rounds = bench.rounds
    for r in range(rounds + _memory_round(bench)):
        k = r % max(1, len(units))
        for unit in units[k:] + units[:k]:  # the start rotates every round
            if unit.name not in bench.wanted:
                continue
            scratch = scratches.get(unit.compiled)
            if not _steppable(unit, scratch):
                unit.status = unit.status if unit.status != "ok" else "skipped (scratch failed)"
                bar.update(1)
                continue
            dt = step_and_record(bench, unit, scratch, r, meter)
            bar.update(1)
            if dt is not None:
                bar.set_postfix_str(f"{unit.label} {dt:.2f}s")


def step_and_record(bench: Bench, unit: Unit, scratch: Unit | None, r: int, meter: MemoryMeter) -> float | None:
    """Round r's step of `unit`: its time, page faults, system time and memory go to the unit's
    records (timed rounds; memory in the memory round on the CPU). Returns the step's seconds, or
    None when it ran out of memory (status "oom")."""
    import torch

    from lrc_src.runtime import trim_heap

    rounds, mem_round = bench.rounds, _memory_round(bench)
    timed = bench.args.warmup <= r < rounds
    if r == rounds:  # the memory round
        trim_heap()
    before = meter.start()
    usage = _usage()
    try:
        dt = run_step(unit, scratch, bench, [b.to(bench.device) for b in bench.batches[min(r, rounds - 1)]])
    except torch.OutOfMemoryError:
        unit.status = "oom"
    if unit.status == "oom":  # outside the except block, so the failed step's tensors are gone
        target = scratch if unit.name == BOUND else unit
        target.optimizer.zero_grad(set_to_none=True)
        _release_cached(torch, bench.device)
        return None
    used, total = meter.stop(before)
    if math.isnan(unit.first_step_s):  # this was the unit's first step
        unit.first_step_s = dt
    if timed:
        now = _usage()
        unit.times.append(dt)
        if unit.last_parts is not None:
            unit.parts.append(unit.last_parts)
        unit.faults.append(now[0] - usage[0])
        unit.sys_s.append(now[1] - usage[1])
    if (timed and not mem_round) or r == rounds:  # working memory (docstring)
        unit.peak_bytes = max(unit.peak_bytes, used)
        unit.peak_total_bytes = max(unit.peak_total_bytes, total)
    return dt


def profile_group(bench: Bench, units: list[Unit], scratches: dict[bool, Unit], bar) -> None:
    """--torch-profiler: one more step of every wanted unit under torch.profiler (not timed)."""
    for unit in units:
        scratch = scratches.get(unit.compiled)
        if unit.name in bench.wanted and _steppable(unit, scratch):
            bar.set_postfix_str(f"profiling {unit.label}")
            profile_step(
                unit,
                scratch,
                bench,
                [b.to(bench.device) for b in bench.batches[-1]],
                Path(bench.args.torch_profiler) / f"{unit.label}.txt",
            )


def time_methods(bench: Bench) -> dict[tuple[str, bool], Unit]:
    """Build and time every group of methods; (method, compiled) -> its unit with its records (its
    module and optimizer released)."""
    import torch
    from tqdm.auto import tqdm

    results: dict[tuple[str, bool], Unit] = {}  # (method, compiled) -> its unit
    meter = MemoryMeter(torch, bench.device)
    per_unit = bench.rounds + _memory_round(bench)
    bar = tqdm(
        total=per_unit * len(bench.wanted) * (1 + bench.both),
        desc=f"{bench.args.profile} throughput",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for group in method_groups(bench):
        units, scratches = build_group(bench, group, results, bar)
        time_rounds(bench, units, scratches, meter, bar)
        if bench.args.torch_profiler:
            profile_group(bench, units, scratches, bar)
        for unit in units:
            if unit.name != BOUND:
                unit.state_bytes = state_bytes(unit) if unit.optimizer is not None else 0.0
            results[unit.name, unit.compiled] = unit
            unit.module = unit.optimizer = None
            unit.params = []
        if bench.schedule == "sequential":
            del units, scratches
            _release_cached(torch, bench.device)
    bar.close()
    for (name, compiled), u in results.items():
        if name == BOUND and ("scratch", compiled) in results:
            u.state_bytes = results["scratch", compiled].state_bytes
    return results


# ---------------------------------------------------------------- results


def device_peak(bench: Bench) -> tuple[str, float, str]:
    """(device name, peak FLOP/s for MFU, where the peak comes from)."""
    import torch

    from lrc_src.runtime import device_name

    device, dtype = bench.device, torch.bfloat16 if bench.mp == "bf16" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak_flops(name, bench.mp == "bf16")
        source = f"table: {name} dense {'bf16' if bench.mp == 'bf16' else 'tf32'}"
        if peak is None:
            peak = measure_peak_flops(torch, device, dtype)
            source = f"measured: best 2048^3 {str(dtype).removeprefix('torch.')} matmul (device not in table)"
        return name, peak, source
    peak = measure_peak_flops(torch, device, dtype)
    source = (
        f"measured: best 2048^3 {str(dtype).removeprefix('torch.')} matmul, "
        f"{torch.get_num_threads()} threads, same process"
    )
    return device_name("cpu"), peak, source


def table_rows(
    bench: Bench, results: dict, device_name: str, peak: float, source: str, load: str
) -> tuple[list[dict], dict[tuple[str, bool], list[float]]]:
    """The CSV's rows (COLUMNS), one per (method, compiled) in --methods order, and every row's
    same-round ratios to the bound of its mode."""
    import torch

    args, B, T, K = bench.args, bench.B, bench.T, bench.K
    tcfg, d_S = bench.teacher.config, bench.base.lrc.student_hidden_size
    tokens, rr = B * T * K, bench.schedule == "round-robin"
    rows, paired_by = [], {}
    keys = [(name, c) for name in bench.wanted for c in (False, True) if (name, c) in results]
    keys += [(name, bench.compiling) for name in bench.wanted if not any(k[0] == name for k in keys)]  # not run
    for name, compiled in keys:
        u = results.get((name, compiled), Unit(name, status="not run", compiled=compiled))
        ok = u.status == "ok" and u.times
        paired = paired_by[name, compiled] = paired_ratios(u, results.get((BOUND, compiled))) if rr else []
        before = paired_ratios(u, results.get((name, False))) if rr and compiled else []  # compiled / eager twin
        med = statistics.median(u.times) if ok else float("nan")
        flops = model_flops(name, tcfg, d_S, B * K, T)
        rows.append(
            {
                "profile": args.profile,
                "device": bench.device.type,
                "device_name": device_name,
                "method": name,
                "batch_size": B,
                "seq_len": T,
                "tokens_per_step": tokens,
                "median_step_s": _f(med),
                "tokens_per_s": _f(tokens / med if ok else float("nan")),
                "peak_mem_mb": _f(u.peak_bytes / 2**20 if ok else float("nan")),
                "threads": torch.get_num_threads(),
                "dtype": bench.dtype_name,
                "peak_total_mb": _f(u.peak_total_bytes / 2**20 if ok else float("nan")),
                "state_mb": _f(u.state_bytes / 2**20),
                "flops_per_step": f"{flops:.4g}",
                "mfu": _f(flops / med / peak if ok else float("nan")),
                "peak_flops": f"{peak:.4g}",
                "peak_flops_source": source,
                "schedule": bench.schedule,
                "timed_steps": len(u.times),
                "load_avg": load,
                "status": u.status,
                "freed_memory": "kept" if bench.kept else "default",
                "grad_accum": K,
                "adamw": bench.adamw,
                "compiled": u.compiled,
                "compiled_head": u.compiled and bench.compile_head,
                "first_step_s": _f(u.first_step_s if ok else float("nan")),
                "min_step_s": _f(min(u.times) if ok else float("nan")),
                "max_step_s": _f(max(u.times) if ok else float("nan")),
                "minor_faults_per_step": _f(statistics.median(u.faults) if ok else float("nan")),
                "sys_s_per_step": _f(statistics.median(u.sys_s) if ok else float("nan")),
                **_spread_columns("over_bound_paired", paired),
                **_spread_columns("over_eager_paired", before),
            }
        )
    return rows, paired_by


def write_rows(rows: list[dict], path: Path) -> None:
    """The tidy CSV (COLUMNS, in order), written atomically."""
    import pandas as pd

    from lrc_src.fileio import write_csv_atomic

    write_csv_atomic(pd.DataFrame(rows, columns=COLUMNS), path)


def print_summary(
    bench: Bench, rows: list[dict], paired_by: dict, device_name: str, peak: float, source: str, load: str, out: Path
) -> None:
    """The readable table and the notes under it (the FLOP floor, paired ratios)."""
    import torch

    args, B, T, K = bench.args, bench.B, bench.T, bench.K
    print(
        f"# {args.profile} on {device_name} ({bench.device.type}, {torch.get_num_threads()} threads, "
        f"{bench.dtype_name}), batch {B} x {T} x {K} micro-batches, {args.steps} timed + {args.warmup} warm-up "
        f"steps, {bench.schedule}"
        + (f", freed memory {'kept' if bench.kept else 'returned to the OS'}" if bench.device.type == "cpu" else "")
    )
    print(f"# peak FLOP/s {peak:.3g} ({source}); 1-min load average {load} (machine cores: {os.cpu_count()})")
    print(f"{'method':18s} {'step_s':>9s} {'tokens/s':>10s} {'peak_mb':>9s} {'state_mb':>9s} {'mfu':>8s}  status")
    for r in rows:
        label = r["method"] + (" (compiled)" if r["compiled"] else "")
        print(
            f"{label:18s} {r['median_step_s']:>9s} {r['tokens_per_s']:>10s} {r['peak_mem_mb']:>9s} "
            f"{r['state_mb']:>9s} {r['mfu']:>8s}  {r['status']}"
        )
    tcfg, d_S = bench.teacher.config, bench.base.lrc.student_hidden_size
    bound_flops = model_flops(BOUND, tcfg, d_S, B * K, T)
    floor = (bound_flops + lrc_extra_flops(tcfg, d_S, B * K, T)) / bound_flops
    targets_only = (bound_flops + lrc_extra_flops(tcfg, d_S, B * K, T, generation=False)) / bound_flops
    print(
        f"# lrc_over_bound if LRC's extra matmuls ran as fast as the bound's and all else were free: {floor:.3f} "
        f"({targets_only:.3f} with the weight generation amortised over unboundedly many tokens per step)"
    )
    for compiled in (False, True):
        paired = paired_by.get(("lrc", compiled))
        if paired:
            print(
                f"# LRC step / bound step of the same round{' (both compiled)' if compiled else ''}: median "
                f"{statistics.median(paired):.3f}, min {min(paired):.3f}, max {max(paired):.3f} "
                f"over {len(paired)} rounds"
            )
    for r in rows:
        if r["over_eager_paired_median"] != "nan":
            print(
                f"# {r['method']} compiled step / eager step of the same round: "
                f"median {r['over_eager_paired_median']}, min {r['over_eager_paired_min']}, "
                f"max {r['over_eager_paired_max']}"
            )
    print(f"# wrote {out}")


PART_NAMES = [
    "step_s",
    "forward_first_s",
    "forward_s",
    "backward_s",
    "window_s",
    "optimizer_s",
    "per_micro_batch_s",
    "fixed_s",
]
PART_COLUMNS = ["profile", "device", "method", "compiled", "batch_size", "seq_len", "grad_accum", "step", *PART_NAMES]


def write_parts(bench: Bench, results: dict, path: Path) -> None:
    """--parts: one row per timed step of every unit (PART_COLUMNS), written atomically."""
    import pandas as pd

    from lrc_src.fileio import write_csv_atomic

    rows = [
        {
            "profile": bench.args.profile,
            "device": bench.device.type,
            "method": name,
            "compiled": compiled,
            "batch_size": bench.B,
            "seq_len": bench.T,
            "grad_accum": bench.K,
            "step": i,
            **{k: _f(v) for k, v in parts.items()},
        }
        for (name, compiled), u in results.items()
        for i, parts in enumerate(u.parts)
    ]
    write_csv_atomic(pd.DataFrame(rows, columns=PART_COLUMNS), path)


def median_parts(unit: Unit) -> dict[str, float]:
    """The median of each part over the unit's timed steps (nan without parts)."""
    return {k: statistics.median(p[k] for p in unit.parts) if unit.parts else float("nan") for k in PART_NAMES}


def print_parts(bench: Bench, results: dict, path: Path) -> None:
    """--parts: the medians of each unit's parts, then LRC's step over the bound's split into the
    work per micro-batch and the work once per step, each beside what its extra matmuls would cost at
    the bound's FLOP rate (the floor)."""
    B, T, K = bench.B, bench.T, bench.K
    print(f"# parts of a step, medians over the timed steps (seconds; written to {path}):")
    print(
        f"{'method':18s} {'step':>8s} {'fwd_first':>9s} {'fwd':>8s} {'bwd':>8s} {'window':>8s} {'optim':>8s} "
        f"{'per_micro':>9s} {'fixed':>8s}"
    )
    timed = [(key, u) for key, u in results.items() if key[0] in bench.wanted and u.parts]
    for (name, compiled), u in sorted(timed, key=lambda kv: (bench.wanted.index(kv[0][0]), kv[0][1])):
        m = median_parts(u)
        label = name + (" (compiled)" if compiled else "")
        print(
            f"{label:18s} "
            + " ".join(f"{m[k]:>{9 if k in ('forward_first_s', 'per_micro_batch_s') else 8}.4f}" for k in PART_NAMES)
        )
    tcfg, d_S = bench.teacher.config, bench.base.lrc.student_hidden_size
    bound_micro_flops = model_flops(BOUND, tcfg, d_S, B, T)
    targets = lrc_extra_flops(tcfg, d_S, B, T, generation=False)  # per micro-batch
    generation = lrc_extra_flops(tcfg, d_S, B, T) - targets  # per step
    for compiled in (False, True):
        lrc, bound = results.get(("lrc", compiled)), results.get((BOUND, compiled))
        if lrc is None or bound is None or not lrc.parts or not bound.parts:
            continue
        lm, bm = median_parts(lrc), median_parts(bound)
        rate = bound_micro_flops / bm["per_micro_batch_s"]  # the bound's FLOP/s per micro-batch
        mode = " (both compiled)" if compiled else ""
        extra_micro, extra_fixed = lm["per_micro_batch_s"] - bm["per_micro_batch_s"], lm["fixed_s"] - bm["fixed_s"]
        print(
            f"# LRC over the bound{mode}, +{lm['step_s'] - bm['step_s']:.4f} s per step: {K} x "
            f"{extra_micro:+.4f} s per micro-batch and {extra_fixed:+.4f} s once per step"
        )
        print(
            f"#   per micro-batch {lm['per_micro_batch_s'] / bm['per_micro_batch_s']:.3f} of the bound's; its extra "
            f"matmuls at the bound's FLOP rate would add {targets / rate:.4f} s "
            f"(a floor of {(bound_micro_flops + targets) / bound_micro_flops:.3f})"
        )
        print(f"#   once per step: the weight generation's matmuls at that rate would take {generation / rate:.4f} s")


def last_line(rows: list[dict]) -> str:
    """'lrc_over_bound=R lrc_over_ordinary=R lrc_tokens_per_s=N mfu=F', from the compiled rows when
    there are any (--compile, --compile both)."""
    by = {r["method"]: r for r in sorted(rows, key=lambda r: r["compiled"])}

    def num(method, col):
        try:
            return float(by[method][col])
        except (KeyError, ValueError):
            return float("nan")

    lrc_s, bound_s = num("lrc", "median_step_s"), num(BOUND, "median_step_s")
    return (
        f"lrc_over_bound={lrc_s / bound_s:.4f} "
        f"lrc_over_ordinary={num('lrc', 'tokens_per_s') / num('scratch', 'tokens_per_s'):.4f} "
        f"lrc_tokens_per_s={num('lrc', 'tokens_per_s'):.1f} mfu={num('lrc', 'mfu'):.4f}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    error = check_args(args)
    if error:
        return fail(error)
    bench = setup(args)
    if isinstance(bench, str):
        return fail(bench)
    error = load_bench_teacher(bench)
    if error:
        return fail(error)

    load_start = os.getloadavg()[0]  # other processes on the machine skew CPU timings: recorded
    results = time_methods(bench)
    load = f"{load_start:.2f}->{os.getloadavg()[0]:.2f}"
    device_name, peak, source = device_peak(bench)
    rows, paired_by = table_rows(bench, results, device_name, peak, source, load)
    out = Path(args.output) if args.output else ROOT / "results" / args.profile / "tables" / "table8_throughput.csv"
    write_rows(rows, out)
    print_summary(bench, rows, paired_by, device_name, peak, source, load, out)
    if args.parts:
        parts_out = out.with_name(out.stem + "_parts.csv")
        write_parts(bench, results, parts_out)
        print_parts(bench, results, parts_out)
    line = last_line(rows)
    sys.stdout.flush()
    sys.stderr.flush()
    print(line, flush=True)
    return 0


def _steppable(unit: Unit, scratch: Unit | None) -> bool:
    """unit can take a step: it has not failed, and for the bound, neither has the scratch unit it
    trains through."""
    return unit.status == "ok" and (unit.name != BOUND or (scratch is not None and scratch.status == "ok"))


def paired_ratios(unit: Unit | None, bound: Unit | None) -> list[float]:
    """unit's timed step / the bound's timed step, round by round ([] when either did not time
    every round)."""
    if unit is None or bound is None or unit.status != "ok" or bound.status != "ok":
        return []
    if not unit.times or len(unit.times) != len(bound.times):
        return []
    return [t / b for t, b in zip(unit.times, bound.times)]


def _release_cached(torch, device) -> None:
    """Collect garbage and hand cached GPU blocks back (between methods, after an OOM)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:.6g}"


def _spread_columns(prefix: str, ratios: list[float]) -> dict[str, str]:
    """CSV columns <prefix>_median/_min/_max of same-round ratios ("nan" when there are none)."""
    nan = float("nan")
    return {
        f"{prefix}_median": _f(statistics.median(ratios) if ratios else nan),
        f"{prefix}_min": _f(min(ratios) if ratios else nan),
        f"{prefix}_max": _f(max(ratios) if ratios else nan),
    }


if __name__ == "__main__":
    sys.exit(main())
