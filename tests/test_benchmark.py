"""benchmarks/throughput.py: the ci profile end to end (a few seconds), the FLOP model and the errors."""

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
REQUIRED = [
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
]
METHODS = ["lrc", "lrc_io", "scratch", "kd", "tinybert", "prune_kd", "bound"]
LAST_LINE = re.compile(r"^lrc_over_bound=(\S+) lrc_over_ordinary=(\S+) lrc_tokens_per_s=(\S+) mfu=(\S+)$")


def _module():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = mod  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(sys.modules["throughput"])
    return sys.modules["throughput"]


def micro(steps: int, warmup: int, threads: int) -> list[str]:
    """The ci profile at a micro batch (2 sequences of 16 tokens): a second or two per method."""
    shape = ["--batch-size", "2", "--seq-len", "16", "--threads", str(threads)]
    return ["--profile", "ci", "--steps", str(steps), "--warmup", str(warmup), *shape]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ci_profile_writes_every_method(tmp_path):
    out = tmp_path / "t8.csv"
    p = run(
        *micro(steps=2, warmup=1, threads=2),
        "--output",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    m = LAST_LINE.match(last)
    assert m, last
    ratios = [float(x) for x in m.groups()]
    assert all(x > 0 and x == x for x in ratios), last
    with out.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(REQUIRED)] == REQUIRED
        rows = list(reader)
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        assert r["status"] == "ok", r
        assert r["profile"] == "ci" and r["device"] == "cpu" and r["threads"] == "2"
        assert int(r["batch_size"]) * int(r["seq_len"]) == int(r["tokens_per_step"]) == 32
        assert float(r["tokens_per_s"]) > 0 and float(r["median_step_s"]) > 0, r
        # > 0: the memory step trims the heap first, so the kept freed memory does not hide the growth
        assert float(r["peak_mem_mb"]) > 0 and 0 < float(r["mfu"]) < 1, r
        assert r["freed_memory"] == ("kept" if sys.platform == "linux" else "default"), r
        assert int(r["timed_steps"]) == 2 and r["adamw"] == "default", r  # the trainer's choice on the CPU
        assert r["compiled"] == "False", r
        assert float(r["min_step_s"]) <= float(r["median_step_s"]) <= float(r["max_step_s"]), r
        if sys.platform == "linux":  # getrusage: counts, not NaN
            assert float(r["minor_faults_per_step"]) >= 0 and float(r["sys_s_per_step"]) >= 0, r
        assert r["tokens_per_s"] and abs(float(r["tokens_per_s"]) * float(r["median_step_s"]) - 32) < 1e-3 * 32
        lo, med, hi = (float(r[f"over_bound_paired_{k}"]) for k in ("min", "median", "max"))
        assert 0 < lo <= med <= hi, r  # each round's step / the bound's step of that round
        if r["method"] == "bound":
            assert (lo, med, hi) == (1.0, 1.0, 1.0), r
    assert all(r["grad_accum"] == "1" for r in rows)
    by = {r["method"]: r for r in rows}
    assert float(m.group(1)) == pytest.approx(
        float(by["lrc"]["median_step_s"]) / float(by["bound"]["median_step_s"]), rel=1e-3
    )
    assert float(m.group(2)) == pytest.approx(
        float(by["lrc"]["tokens_per_s"]) / float(by["scratch"]["tokens_per_s"]), rel=1e-3
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--profile", "ci", "--methods", "lrc,foo"], "unknown method"),
        (["--profile", "paper-1.5b"], "--device cuda"),
        (["--profile", "ci", "--compile", "--warmup", "0"], "--compile needs --warmup >= 1"),
        (["--profile", "ci", "--parts"], "--parts needs --grad-accum > 1"),
        (["--profile", "ci", "--methods", "lrc,lrc_regen"], "['lrc_regen'] need --grad-accum > 1"),
    ],
)
def test_one_line_errors(args, message):
    p = run(*args)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("tokenise.py", ["--mb", "0"], "--mb must be > 0"),
        ("tokenise.py", ["--seq-len", "0"], "argument --seq-len: expected an integer >= 1"),
        ("tokenise.py", ["--procs", "1"], "argument --procs: expected an integer >= 2"),
        ("tokenise.py", ["--cpus", "0-x"], "--cpus '0-x'"),
        ("init_starts.py", ["--output", "x.csv", "--threads", "-1"], "argument --threads: expected an integer >= 1"),
    ],
)
def test_other_benchmarks_refuse_bad_arguments(script, args, message, tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_fails_cleanly():
    p = run("--profile", "ci", "--device", "cuda")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], p.stderr


def test_help_explains_profiles():
    p = run("--help")
    assert p.returncode == 0
    for word in (
        "ci",
        "tiny",
        "paper-1.5b",
        "--device",
        "--steps",
        "--warmup",
        "--batch-size",
        "--seq-len",
        "--threads",
        "--output",
        "lrc_over_bound",
    ):
        assert word in p.stdout


def test_paper_teacher_shape_and_flops():
    """The paper-1.5b teacher is Llama-3.2-3B-shaped (3.21B parameters); FLOPs follow the docstring."""
    tp = _module()
    from transformers import AutoModelForCausalLM

    cfg = tp.paper_teacher_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 3.20e9 < n < 3.22e9, n
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.tie_word_embeddings
    # P_T = every layer matmul + the (tied) head: all parameters except the embedding lookup and norms
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert tp.matmul_params(cfg, 3072) == n - norms
    B, T, d_S = 1, 2048, 1536
    attn = 2.0 * B * 28 * T**2 * 24 * 128
    want = 6 * B * T * tp.matmul_params(cfg, d_S) + 3 * attn + 2 * B * T * tp.matmul_params(cfg, 3072) + attn
    assert tp.model_flops("lrc", cfg, d_S, B, T) == pytest.approx(want)
    assert tp.model_flops("scratch", cfg, d_S, B, T) == pytest.approx(6 * B * T * tp.matmul_params(cfg, d_S) + 3 * attn)
    # LRC's extra matmuls: generation 4 d_T P_S per step + the o/down targets 8 N d_T d_S per layer.
    # Paper shape: the targets alone are 6.05% of the bound, so LRC/bound >= 1.06 at any batch
    gen, targets = 4.0 * 3072 * tp.matmul_params(cfg, d_S), 8.0 * B * T * 3072 * d_S * 28
    assert tp.lrc_extra_flops(cfg, d_S, B, T) == pytest.approx(gen + targets)
    assert tp.lrc_extra_flops(cfg, d_S, B, T, generation=False) == pytest.approx(targets)
    assert targets / tp.model_flops("bound", cfg, d_S, B, T) == pytest.approx(0.0605, abs=5e-4)
    assert tp.cuda_peak_flops("NVIDIA H100 80GB HBM3", True) == 989e12
    assert tp.cuda_peak_flops("NVIDIA H100 PCIe", True) == 756e12
    assert tp.cuda_peak_flops("NVIDIA A100-SXM4-80GB", True) == 312e12
    assert tp.cuda_peak_flops("NVIDIA H200", True) == 989e12


def test_paired_ratios_pair_rounds():
    tp = _module()
    lrc, bound = tp.Unit("lrc", times=[2.0, 3.0, 4.5]), tp.Unit("bound", times=[1.0, 2.0, 3.0])
    assert tp.paired_ratios(lrc, bound) == [2.0, 1.5, 1.5]
    assert tp.paired_ratios(tp.Unit("lrc", times=[2.0]), bound) == []  # a round missing: no pairs
    assert tp.paired_ratios(tp.Unit("lrc", times=[2.0, 3.0, 4.5], status="oom"), bound) == []
    assert tp.paired_ratios(lrc, None) == []


def test_grad_accum_times_micro_batches_and_lrc_regen(tmp_path):
    """--grad-accum K: tokens per step = B*T*K for every method, and lrc_regen (weights generated
    per micro-batch) is timed beside lrc (generated once per step)."""
    out = tmp_path / "t8.csv"
    p = run(
        *micro(steps=1, warmup=1, threads=1),
        "--grad-accum",
        "3",
        "--methods",
        "lrc,lrc_regen,scratch,bound",
        "--output",
        str(out),
        "--parts",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["lrc", "lrc_regen", "scratch", "bound"]
    for r in rows:
        assert r["status"] == "ok" and r["grad_accum"] == "3" and int(r["tokens_per_step"]) == 2 * 16 * 3, r
    # --parts: every timed step of every method split into its parts, which add up to the step
    with (tmp_path / "t8_parts.csv").open() as f:
        parts = list(csv.DictReader(f))
    assert sorted(r["method"] for r in parts) == ["bound", "lrc", "lrc_regen", "scratch"], parts
    measured = ("step_s", "forward_first_s", "forward_s", "backward_s", "window_s", "optimizer_s")
    for r in parts:
        x = {k: float(r[k]) for k in measured}
        assert all(v >= 0 for v in x.values()) and r["grad_accum"] == "3", r
        assert 3 * float(r["per_micro_batch_s"]) + float(r["fixed_s"]) == pytest.approx(x["step_s"], rel=1e-4), r
        assert x["forward_first_s"] + x["window_s"] + x["optimizer_s"] <= x["step_s"], r
        step_median = float(next(row for row in rows if row["method"] == r["method"])["median_step_s"])
        assert x["step_s"] <= step_median * 1.0001, r  # one timed step, so the median is that step, clock to clock
    assert "# LRC over the bound, +" in p.stdout and "per micro-batch" in p.stdout, p.stdout[-2000:]
    assert run("--profile", "ci", "--grad-accum", "0").returncode == 2


def test_torch_profiler_writes_each_wanted_methods_operators(tmp_path):
    """--torch-profiler DIR: one extra step per wanted method under torch.profiler, its operator
    table in DIR/<method>.txt (scratch is built for the bound but not wanted: no table); the CSV
    still holds only the timed steps. --adamw fused is recorded (the trainer's CPU choice is default)."""
    out, prof = tmp_path / "t8.csv", tmp_path / "prof"
    p = run(
        *micro(steps=1, warmup=0, threads=1),
        "--methods",
        "lrc,bound",
        "--torch-profiler",
        str(prof),
        "--adamw",
        "fused",
        "--output",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in prof.iterdir()) == ["bound.txt", "lrc.txt"]
    for name in ("lrc", "bound"):
        text = (prof / f"{name}.txt").read_text()
        assert text.startswith(f"# {name}: one step under torch.profiler") and "aten::mm" in text, text[:500]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["timed_steps"]), r["adamw"]) for r in rows] == [(1, "fused"), (1, "fused")]


def test_init_starts_scores_every_start(tmp_path):
    out = tmp_path / "starts.csv"
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "init_starts.py"),
            "--config",
            "config/ci.yaml",
            "--threads",
            "1",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["init"], r["untie_lm_head"]) for r in rows] == [
        ("teacher", ""),
        ("normal", "False"),
        ("prune", "False"),
        ("prune_scaled", "False"),
        ("pca", "False"),
        ("pca", "True"),
    ]
    assert all(float(r["value"]) > 0 for r in rows)


def test_compiled_layers_are_timed_and_recorded(tmp_path):
    """--compile: every method's decoder layers (and the bound's teacher) through torch.compile,
    compiled in the warm-up step, the head's per-chunk work too with --compile-head on (CUDA's
    default); the CSV says so."""
    out = tmp_path / "t8c.csv"
    p = run(
        *micro(steps=1, warmup=1, threads=2),
        "--methods",
        "lrc,kd,tinybert,bound",
        "--compile",
        "--compile-head",
        "on",
        "--output",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert LAST_LINE.match(p.stdout.strip().splitlines()[-1])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["lrc", "kd", "tinybert", "bound"]
    assert all(r["status"] == "ok" and float(r["median_step_s"]) > 0 for r in rows), rows
    by = {r["method"]: r for r in rows}
    # tinybert stays eager (TinyBERTStyle.compile_layers refuses), even through the shared compiled teacher
    assert [by[m]["compiled"] for m in by] == ["True", "True", "False", "True"], rows
    assert [by[m]["compiled_head"] for m in by] == ["True", "True", "False", "True"], rows
    assert all(float(by[m]["first_step_s"]) > 0 for m in by), rows  # the compiling step is reported


def test_compile_both_pairs_eager_and_compiled_steps(tmp_path):
    """--compile both: every method eagerly and compiled in the same rounds (one module each, the
    eager twin under force_eager), each paired with the bound of its own mode; the last line reports
    the compiled rows."""
    out = tmp_path / "t8b.csv"
    p = run(
        *micro(steps=2, warmup=1, threads=2),
        "--methods",
        "lrc,scratch,tinybert,bound",
        "--compile",
        "both",
        "--output",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    m = LAST_LINE.match(p.stdout.strip().splitlines()[-1])
    assert m, p.stdout[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    # tinybert refuses to compile: timed once, eagerly
    assert [(r["method"], r["compiled"]) for r in rows] == [
        ("lrc", "False"),
        ("lrc", "True"),
        ("scratch", "False"),
        ("scratch", "True"),
        ("tinybert", "False"),
        ("bound", "False"),
        ("bound", "True"),
    ], rows
    assert all(r["status"] == "ok" and int(r["timed_steps"]) == 2 for r in rows), rows
    assert all(r["compiled_head"] == "False" for r in rows), rows  # --compile-head auto: CUDA only
    by = {(r["method"], r["compiled"] == "True"): r for r in rows}
    # each mode's bound is its own: 1.0 against itself, and compiled rows carry their step / the eager twin's
    for (name, compiled), r in by.items():
        paired = [float(r[f"over_bound_paired_{k}"]) for k in ("min", "median", "max")]
        before = [float(r[f"over_eager_paired_{k}"]) for k in ("min", "median", "max")]
        assert 0 < paired[0] <= paired[1] <= paired[2], r
        if name == "bound":
            assert paired == [1.0, 1.0, 1.0], r
        if compiled:
            assert 0 < before[0] <= before[1] <= before[2], r
        else:
            assert all(x != x for x in before), r  # NaN: nothing to compare an eager step with
    assert float(m.group(1)) == pytest.approx(
        float(by["lrc", True]["median_step_s"]) / float(by["bound", True]["median_step_s"]), rel=1e-3
    )
    # the last line prints tokens/s to one decimal: at a slow step that is more than rel 1e-3
    assert float(m.group(3)) == pytest.approx(float(by["lrc", True]["tokens_per_s"]), rel=1e-3, abs=0.05)
    assert "lrc compiled step / eager step of the same round" in p.stdout


def test_a_method_that_does_not_fit_is_reported_not_fatal(tmp_path):
    """A method whose build runs out of memory (the GPU case; faked here) gets status 'oom (build)',
    and so does the bound that trains through scratch; the other methods, eager and compiled, are
    timed as usual."""
    out = tmp_path / "t8o.csv"
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('throughput', {str(SCRIPT)!r})\n"
        "tp = importlib.util.module_from_spec(spec); sys.modules['throughput'] = tp; spec.loader.exec_module(tp)\n"
        "build = tp.build_unit\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'scratch':\n"
        "        raise torch.OutOfMemoryError('faked')\n"
        "    return build(name, *a, **k)\n"
        "tp.build_unit = fake\n"
        "sys.exit(tp.main(sys.argv[1:]))\n"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *micro(steps=1, warmup=1, threads=2),
            "--methods",
            "lrc,scratch,bound",
            "--compile",
            "both",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    with out.open() as f:
        rows = [(r["method"], r["compiled"], r["status"]) for r in csv.DictReader(f)]
    assert rows == [
        ("lrc", "False", "ok"),
        ("lrc", "True", "ok"),
        ("scratch", "True", "oom (build)"),
        ("bound", "True", "oom (build)"),
    ], rows


def test_gpu_script_rejects_an_unknown_run(tmp_path):
    """benchmarks/gpu_table8.sh NAME...: an unknown run name is reported and fails the script
    (without a GPU nothing else runs here)."""
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_table8.sh"), "nope"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
        timeout=120,
    )
    assert p.returncode == 1 and "unknown run nope" in p.stderr, (p.stdout, p.stderr)
    assert "b3x8_paired" in p.stderr
