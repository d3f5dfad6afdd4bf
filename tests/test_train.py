"""The trainer on the ci teacher: every method learns, kill -9 + resume is exact, bad input fails cleanly."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import assert_same_run, read_metrics
from safetensors.torch import load_file

from lrc_src.cli import main
from lrc_src.config import config_from_dict, dump_config, load_config, same_experiment
from lrc_src.factory import make_optimizer
from lrc_src.train import train

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "config" / "ci.yaml"


def ci_cfg(*overrides):
    return load_config(CI, list(overrides))


@pytest.mark.parametrize("method", ["lrc", "scratch", "kd", "tinybert", "prune_kd"])
def test_each_method_learns(method, tmp_path):
    cfg = ci_cfg(
        f"method={method}",
        "train.max_steps=12",
        "train.lr=1e-2",
        "train.eval_every=0",
        "train.save_every=100",
        "train.warmup_ratio=0",
    )
    run = train(cfg, tmp_path / method, progress=False)
    rows = read_metrics(run)
    assert len(rows) == 12
    first = sum(float(r["loss"]) for r in rows[:3]) / 3
    last = sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < first, (method, first, last)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 12
    assert (run / "student" / "config.json").is_file() and (run / "student" / "tokenizer.json").is_file()
    assert rows[-1]["heldout_loss"] != ""
    # the stack and device that made the numbers, in run.json and in the student's card
    assert info["software"]["torch"] == torch.__version__ and info["software"]["device"].endswith("cores visible)")
    card = (run / "student" / "README.md").read_text()
    assert f"- transformers: {transformers.__version__}" in card.split("## Framework versions")[1]


def test_sft_masks_prompt_and_learns(tmp_path):
    base = train(ci_cfg("train.max_steps=1"), tmp_path / "base", progress=False)
    chats = tmp_path / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(20):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Say the number {i}."},
                            {"role": "assistant", "content": f"The number is {i}."},
                        ]
                    }
                )
                + "\n"
            )
    cfg = ci_cfg(
        "method=sft",
        f"sft.model={base / 'student'}",
        f"sft.chat_data={chats}",
        "train.max_steps=10",
        "train.lr=1e-2",
        "data.heldout_frac=0.1",
        "train.warmup_ratio=0",
    )
    rows = read_metrics(train(cfg, tmp_path / "sft", progress=False))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    from transformers import AutoTokenizer

    from lrc_src.chat import encode_conversation

    tok = AutoTokenizer.from_pretrained(base / "student")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    ids, labels = encode_conversation(tok, msgs, 64)
    kept = tok.decode([int(i) for i in labels if i != -100])
    assert "hello there" in kept and "hi" not in kept.replace("hello there", "")

    # ShareGPT's roles (human/gpt) leave nothing to train on: refused, not a run of zero losses
    from lrc_src.chat import encode_chat_file

    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(
        json.dumps({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]})
    )
    with pytest.raises(ValueError, match=r"no assistant reply within data.seq_len=64 .*\['gpt', 'human'\]"):
        encode_chat_file(tok, sharegpt, 64)
    sharegpt.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="sharegpt.jsonl:1: expected"):
        encode_chat_file(tok, sharegpt, 64)


def test_make_optimizer_groups_and_kernels():
    """Matrices at lr, vectors at lr_norm; the fused kernel (the trainer's choice on CUDA) and the
    foreach one make the same update as PyTorch's default up to rounding; a bad kernel is a clear error."""
    tc = load_config("config/ci.yaml", ["train.lr=0.01", "train.lr_norm=0.003"]).train
    torch.manual_seed(0)
    start = {"w": torch.randn(6, 4), "norm": torch.randn(4)}
    grads = [{k: torch.randn_like(v) for k, v in start.items()} for _ in range(3)]
    finals = {}
    for kernel in ("default", "fused", "foreach"):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        opt = make_optimizer(list(params.items()), tc, kernel=kernel)
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.003]
        assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
        assert bool(opt.defaults.get("fused")) is (kernel == "fused")
        assert bool(opt.defaults.get("foreach")) is (kernel == "foreach")
        for g in grads:
            for k, p in params.items():
                p.grad = g[k].clone()
            opt.step()
        finals[kernel] = {k: p.detach() for k, p in params.items()}
    for k in start:
        assert not torch.equal(finals["default"][k], start[k])
        for kernel in ("fused", "foreach"):
            torch.testing.assert_close(finals[kernel][k], finals["default"][k], rtol=1e-5, atol=1e-6)
    assert len(make_optimizer([("norm", torch.nn.Parameter(torch.ones(3)))], tc).param_groups) == 1
    with pytest.raises(ValueError, match="AdamW kernel 'apex'"):
        make_optimizer([("norm", torch.nn.Parameter(torch.ones(3)))], tc, kernel="apex")


def test_train_step_means_micro_batches_and_stops_before_a_non_finite_update():
    """lrc_src.step.train_step (the trainer's step, which benchmarks/throughput.py times): K
    micro-batches inside the window make one update with the gradient of their mean loss, report
    the mean loss terms and the gradient norm and step the schedule; a non-finite loss raises
    before any update."""
    import contextlib
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lrc_src.step import NonFiniteLossError, train_step

    class Square(torch.nn.Module):  # loss = scale * (w . x)^2 for a micro-batch x = ids [2]
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

        def forward(self, ids, labels=None):
            dot = (self.w * ids.float()).sum()
            return SimpleNamespace(loss=dot**2 * (1.0 if labels is None else labels), losses={"dot": dot})

    acc = Accelerator()
    model = Square().to(acc.device)
    x1, x2 = torch.tensor([1, 2], device=acc.device), torch.tensor([3, 1], device=acc.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    opened = []

    @contextlib.contextmanager
    def window():
        opened.append("enter")
        yield
        opened.append("exit")

    # dots -3 and 1, losses 9 and 1; the mean loss's gradient ((2*-3)*x1 + (2*1)*x2) / 2 = [0, -5]
    sums, norm = train_step(
        model, [(x1, None), (x2, None)], opt, [model.w], 100.0, acc, window, scheduler=sched, clock=opened.append
    )
    assert sums == {"loss": 5.0, "dot": -1.0} and float(norm) == pytest.approx(5.0)
    torch.testing.assert_close(model.w.detach().cpu(), torch.tensor([1.0, -1.5]))
    assert model.w.grad is None and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # the clock marks the end of each part, the window's closing backward included (benchmarks' --parts)
    assert opened == ["enter", "forward", "backward", "forward", "backward", "exit", "window", "optimizer"], opened

    before = model.w.detach().clone()
    nan = torch.tensor(float("nan"), device=acc.device)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\)"):
        train_step(model, [(x1, None), (x2, nan)], opt, [model.w], 100.0, acc)
    assert torch.equal(model.w.detach(), before) and opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_steps_with_fused_adamw(tmp_path):
    """On one GPU the trainer builds the fused AdamW (its checkpoint's param groups say so) and
    trains: finite losses, a loadable student."""
    run = train(ci_cfg("train.max_steps=3", "train.keep_optimizer_state=true"), tmp_path / "r", progress=False)
    state = json.loads((run / "checkpoint" / "state.json").read_text())["optimizer"]
    assert state["param_groups"] and all(g.get("fused") for g in state["param_groups"]), state["param_groups"]
    rows = read_metrics(run)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows), rows
    assert (run / "student" / "model.safetensors").is_file()


def test_kill_and_resume_is_exact(tmp_path):
    """kill -9 mid-run, re-run the same command: it starts from the last checkpoint (the rows up to
    it are kept as written, timings included) and metrics.csv equals an uninterrupted run's."""
    args = [
        "--config",
        str(CI),
        "--set",
        "train.max_steps=10",
        "--set",
        "train.save_every=3",
        "--set",
        "train.eval_every=5",
    ]
    ref = tmp_path / "ref"
    assert main(["train", *args, "--output-dir", str(ref), "--no-progress"]) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lrc_src.cli", "train", *args, "--output-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "run.json").exists(), "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL, "the run stopped before it was killed"
    resumed_at = json.loads(state.read_text())["step"]
    kept = read_metrics(run)[:resumed_at]
    assert [int(r["step"]) for r in kept] == list(range(1, resumed_at + 1))
    assert subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    assert read_metrics(run)[:resumed_at] == kept  # resumed, not trained again from step 0

    assert_same_run(ref, run, steps=10)  # the metrics and the final students are identical too


@pytest.mark.parametrize("method", ["lrc", "scratch", "kd", "tinybert", "prune_kd"])
def test_each_method_resumes_exactly_through_accumulation_and_an_export(method, tmp_path, monkeypatch):
    """Options together, as a user sets them: micro-batch accumulation, an export between two
    checkpoints, a run stopped right after a checkpoint and run again. The resumed run's metrics,
    intermediate export and student equal an uninterrupted run's."""
    import lrc_src.train as trainer

    overrides = [f"method={method}", "train.max_steps=5", "train.grad_accum=2", "train.batch_size=2"]
    overrides += ["train.save_every=2", "train.eval_every=3", "train.export_at=[3]", "train.warmup_ratio=0"]
    ref = train(ci_cfg(*overrides), tmp_path / "ref", progress=False)

    class Stop(Exception):
        pass

    def save_then_stop(ckpt, method, optimizer, scheduler, step, *args, **kwargs):
        save_checkpoint(ckpt, method, optimizer, scheduler, step, *args, **kwargs)
        if step == 4:
            raise Stop

    save_checkpoint = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train(ci_cfg(*overrides), tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert [int(r["step"]) for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    run = train(ci_cfg(*overrides), tmp_path / "cut", progress=False)

    assert all(float(r["loss"]) == float(r["loss"]) for r in read_metrics(ref))  # no NaN
    exports = ("exports/step_3/model.safetensors", "exports/step_3/projections.safetensors")
    assert_same_run(ref, run, steps=5, files=(*exports, "student/model.safetensors"))


def test_learning_rate_schedule_warms_up_then_decays_linearly_to_zero():
    """The paper's schedule: linear warmup over ceil(warmup_ratio * steps) steps, then linear decay
    to 0 at the last step (hand-computed factors of the base lr, by optimizer steps taken)."""
    from lrc_src.factory import lr_lambda

    f = lr_lambda(10, 0.2)  # 2 warmup steps
    assert [f(s) for s in range(11)] == [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    g = lr_lambda(4, 0.0)  # no warmup
    assert [g(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda(1000, 0.005)(0) == 0.2  # 5 warmup steps: a fifth of the lr at the first


def _run_snippet(script: str, mode: str) -> str:
    """stdout of `python -c script mode` in a fresh process (its own allocator state)."""
    p = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


FAULTS_AFTER_FREE = """
import resource, sys, torch
import lrc_src.train  # the trainer's imports: the heap as a training process has it
from lrc_src.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(64 << 20, dtype=torch.uint8); del x  # 64 MB: above glibc's largest mmap threshold
f0 = faults()
for _ in range(5):
    x = torch.ones(64 << 20, dtype=torch.uint8); del x
print(applied, faults() - f0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_keep_freed_memory_reuses_freed_pages():
    """With keep_freed_memory a freed 64 MB block is reused; glibc's default unmaps it, so every new
    allocation page-faults it in again (counted as minor faults of a fresh process)."""

    def faults(mode):
        applied, n = _run_snippet(FAULTS_AFTER_FREE, mode).split()
        return applied, int(n)

    (applied, kept), (_, default) = faults("keep"), faults("default")
    assert applied == "True"
    # glibc's default faults each of the five blocks in afresh (5 x 16384 faults with 4 KB pages;
    # fewer with transparent huge pages), kept memory one or two of them: measured 16384 against
    # 81925 on a quiet machine, and once 32768 under make test's load, where another allocation can
    # land in the freed block before the next one reuses it
    assert default > 0 and kept * 2 < default, (kept, default)


HEAP_TOP_AFTER_FREE = """
import ctypes, sys
from lrc_src.runtime import _M_TRIM_THRESHOLD, glibc, keep_freed_memory
libc = glibc()
libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
assert keep_freed_memory()
if sys.argv[1] == "2gb":  # the threshold keep_freed_memory used to set (the control)
    assert libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
# glibc directly, so that nothing else lands on the heap between the malloc and the free: the
# block then borders the heap's top when freed (a torch tensor's own small allocations may not)
block = libc.malloc(9 << 28)  # 2.25 GB of heap (address space; pages never touched)
assert block, "malloc failed"
top = libc.sbrk(0)
libc.free(block)
print(top - libc.sbrk(0))  # bytes the free gave back to the OS
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_keep_freed_memory_never_trims_the_heap():
    """Freeing a block above 2 GB leaves the heap's end (program break) where it was; with the 2 GB
    trim threshold used before (the control), glibc gives the block back to the OS."""
    assert int(_run_snippet(HEAP_TOP_AFTER_FREE, "keep")) == 0
    assert int(_run_snippet(HEAP_TOP_AFTER_FREE, "2gb")) >= 2 << 30


def test_freed_memory_setting_changes_nothing_but_speed(tmp_path):
    args = ["--config", str(CI), "--set", "train.max_steps=4", "--no-progress"]
    runs = {}
    for flag in ([], ["--return-freed-memory"]):
        runs[bool(flag)] = tmp_path / f"r{len(flag)}"
        p = subprocess.run(
            [sys.executable, "-m", "lrc_src.cli", "train", *args, *flag, "--output-dir", str(runs[bool(flag)])],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
    assert_same_run(runs[False], runs[True], steps=4, files=())


def test_rerun_of_complete_run_is_a_no_op(tmp_path):
    cfg = ci_cfg("train.max_steps=2")
    run = train(cfg, tmp_path / "r", progress=False)
    # a finished run drops its optimizer state (disk) unless asked to keep it
    assert (run / "checkpoint" / "trainable.safetensors").is_file()
    assert not (run / "checkpoint" / "optimizer.safetensors").exists()
    kept = train(ci_cfg("train.max_steps=2", "train.keep_optimizer_state=true"), tmp_path / "k", progress=False)
    assert (kept / "checkpoint" / "optimizer.safetensors").is_file()
    mtime = (run / "metrics.csv").stat().st_mtime
    train(cfg, run, progress=False)
    assert (run / "metrics.csv").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="different config"):
        train(ci_cfg("train.max_steps=3"), run, progress=False)
    # the workflow's choice: a changed config retrains from scratch in the same folder
    train(ci_cfg("train.max_steps=3"), run, progress=False, restart_on_config_change=True)
    assert len(read_metrics(run)) == 3 and "max_steps: 3" in (run / "config.yaml").read_text()


def test_a_run_trained_again_to_another_result_gets_another_record(tmp_path, monkeypatch):
    """run.json is all the workflow's rules read of a run, and snakemake skips a job whose newer
    input has the same bytes: a run trained again to another result must get another record, and
    so must a run finished again on another software stack."""
    from lrc_src.fileio import sha256_file

    run = train(ci_cfg("train.max_steps=2"), tmp_path / "r", progress=False)
    first = json.loads((run / "run.json").read_text())
    assert first["trainable_sha256"] == sha256_file(run / "checkpoint" / "trainable.safetensors")
    assert first["metrics_sha256"] == sha256_file(run / "metrics.csv")
    train(ci_cfg("train.max_steps=2", "lrc.alpha=0.5"), run, progress=False, restart_on_config_change=True)
    second = json.loads((run / "run.json").read_text())
    assert second["trainable_sha256"] != first["trainable_sha256"]
    assert second["metrics_sha256"] != first["metrics_sha256"]
    same = [k for k in first if not k.endswith("_sha256")]
    assert {k: first[k] for k in same} == {k: second[k] for k in same}  # only the digests tell them apart
    (run / "run.json").unlink()  # finished again from its checkpoint, under another transformers
    monkeypatch.setattr("lrc_src.train.software", lambda device: {**second["software"], "transformers": "5.99.0"})
    train(ci_cfg("train.max_steps=2", "lrc.alpha=0.5"), run, progress=False, restart_on_config_change=True)
    third = json.loads((run / "run.json").read_text())
    assert third["software"]["transformers"] == "5.99.0" and third != second
    assert {k: v for k, v in third.items() if k != "software"} == {k: v for k, v in second.items() if k != "software"}


@pytest.mark.parametrize("keep", [False, True])
def test_finished_run_without_its_record_is_finalised_again_not_retrained(keep, tmp_path, capsys):
    """snakemake --forceall deletes run.json before the rule runs again: the finished checkpoint
    (its optimizer state dropped unless kept) yields the same student and record, with no step."""
    cfg = ci_cfg("train.max_steps=2", f"train.keep_optimizer_state={str(keep).lower()}")
    run = train(cfg, tmp_path / "r", progress=False)
    record, metrics = (run / "run.json").read_text(), (run / "metrics.csv").read_text()
    student = load_file(run / "student" / "model.safetensors")
    (run / "run.json").unlink()
    shutil.rmtree(run / "student")
    train(cfg, run, progress=False, restart_on_config_change=True)
    assert "finished at step 2: writing its student and run.json again" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text()) == json.loads(record)
    assert (run / "metrics.csv").read_text() == metrics  # no step ran, no row was added
    again = load_file(run / "student" / "model.safetensors")
    assert again.keys() == student.keys() and all(torch.equal(again[k], student[k]) for k in student)
    assert (run / "checkpoint" / "optimizer.safetensors").exists() == keep


def test_restart_on_config_change_discards_a_stale_checkpoint(tmp_path):
    run = tmp_path / "r"
    train(ci_cfg("train.max_steps=4", "train.save_every=2"), run, progress=False)
    (run / "run.json").unlink()  # an interrupted run: checkpoint but no run.json
    with pytest.raises(ValueError, match="holds a run of a different config"):
        train(ci_cfg("train.max_steps=4", "lrc.alpha=0.5"), run, progress=False)
    # a restart whose setup fails (here: no such teacher) leaves the old run as it was
    before = {p.relative_to(run) for p in run.rglob("*")}
    with pytest.raises(FileNotFoundError):
        train(
            ci_cfg("lrc.alpha=0.5", f"teacher={tmp_path / 'none'}"), run, progress=False, restart_on_config_change=True
        )
    assert {p.relative_to(run) for p in run.rglob("*")} == before
    (run / "trackers").mkdir()  # the old run's tracker files go with it
    train(ci_cfg("train.max_steps=4", "lrc.alpha=0.5"), run, progress=False, restart_on_config_change=True)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert not (run / "trackers").exists()


def test_a_folder_of_another_config_is_refused_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "r"
    train(ci_cfg("train.max_steps=2"), run, progress=False)
    shutil.rmtree(run / "checkpoint")  # a run killed before its first save holds config.yaml alone
    (run / "run.json").unlink()
    with pytest.raises(ValueError, match="holds a run of a different config"):
        train(ci_cfg("train.max_steps=2", "lrc.alpha=0.5"), run, progress=False)


def test_a_finished_run_keeps_one_checkpoint(tmp_path):
    """A final save cut off after its swap leaves checkpoint.old/ beside the finished checkpoint/:
    finishing the run again removes it; its card is written before run.json."""
    cfg = ci_cfg("train.max_steps=2")
    run = train(cfg, tmp_path / "r", progress=False)
    (run / "run.json").unlink()
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    (run / "student" / "README.md").unlink()
    train(cfg, run, progress=False)
    assert not (run / "checkpoint.old").exists() and (run / "student" / "README.md").is_file()


@pytest.mark.parametrize("init", ["prune_scaled", "pca"])
def test_teacher_derived_starts_train(init, tmp_path):
    """lrc and prune_kd from the same teacher-derived start: same held-out loss before training."""
    runs = {}
    for method in ("lrc", "prune_kd"):
        cfg = ci_cfg(
            f"method={method}",
            f"lrc.init={init}",
            "lrc.untie_lm_head=true",
            "train.max_steps=2",
            "train.lr=1.0e-12",
            "train.eval_every=1",
            "train.mixed_precision='no'",
        )
        runs[method] = read_metrics(train(cfg, tmp_path / method, progress=False))
    a, b = (float(runs[m][0]["heldout_loss"]) for m in ("lrc", "prune_kd"))
    assert a == pytest.approx(b, abs=1e-3)


def test_grad_accum_and_max_tokens(tmp_path):
    cfg = ci_cfg("train.max_tokens=1024", "train.grad_accum=2", "train.batch_size=2")
    run = train(cfg, tmp_path / "acc", progress=False)
    rows = read_metrics(run)
    assert len(rows) == 4 and rows[-1]["tokens"] == "1024"  # 1024 / (2*2*64) = 4 steps


def _bad(tmp_path, capsys, *argv, config=CI):
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), *argv, "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lrc: error: "), err
    assert not (out / "run.json").exists() and not (out / "metrics.csv").exists()
    return err[0]


def test_bad_input_one_line_errors(tmp_path, capsys):
    assert "does-not-exist" in _bad(tmp_path, capsys, "--set", f"teacher={tmp_path / 'does-not-exist'}")
    assert "method='distill'" in _bad(tmp_path, capsys, "--set", "method=distill")
    assert "seq_len=0" in _bad(tmp_path, capsys, "--set", "data.seq_len=0")
    assert "max_position_embeddings=2048" in _bad(tmp_path, capsys, "--set", "data.seq_len=2049")
    for bad in ("train.max_tokens=-1", "train.grad_clip=0", "train.eval_every=-1", "train.export_at=[0]"):
        assert bad.split("=")[0] in _bad(tmp_path, capsys, "--set", bad)
    (tmp_path / "afile").write_text("")
    out = ["--output-dir", str(tmp_path / "afile")]
    assert main(["train", "--config", str(CI), *out, "--no-progress"]) == 2
    assert "cannot be a folder: it is a file" in capsys.readouterr().err
    assert main(["train", "--config", str(CI), "--output-dir", str(tmp_path / "afile" / "run"), "--no-progress"]) == 2
    assert "lies under the file" in capsys.readouterr().err
    # lrc prepare checks its folder before it loads anything, and never deletes a real teacher/ folder
    assert main(["prepare", "--config", str(CI), "--output-dir", str(tmp_path / "afile")]) == 2
    assert "cannot be a folder: it is a file" in capsys.readouterr().err
    (tmp_path / "assets" / "teacher").mkdir(parents=True)
    assert main(["prepare", "--config", str(CI), "--output-dir", str(tmp_path / "assets")]) == 2
    assert "is not the link lrc prepare writes there" in capsys.readouterr().err
    assert (tmp_path / "assets" / "teacher").is_dir()
    # baseline settings are checked with the config, before the run folder exists
    for bad in ("baseline.kl_reduction=token-mean", "baseline.kl_temperature=0", "baseline.calibration_batches=0"):
        assert bad.split("=")[0] in _bad(tmp_path, capsys, "--set", "method=kd", "--set", bad)
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse: usage and one error line, exit 2
        main(["train", "--config", str(CI), "--threads", "-1", "--output-dir", str(tmp_path / "t")])
    assert "--threads: expected an integer >= 1, got '-1'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "local:" in _bad(tmp_path, capsys, "--set", f"data.corpus=['local:{empty}/*.txt']")
    bad_yaml = tmp_path / "bad.yaml"
    d = yaml.safe_load(CI.read_text())
    d["train"]["learning_rate"] = 0.1
    bad_yaml.write_text(yaml.safe_dump(d))
    assert "train.learning_rate" in _bad(tmp_path, capsys, config=bad_yaml)
    assert "config file" in _bad(tmp_path, capsys, config=tmp_path / "missing.yaml")


def test_inputs_that_would_mislead_are_refused_before_anything_is_written(tmp_path, capsys):
    """Text that is not text, a teacher folder without a tokenizer, a held-out split smaller than
    one block (its loss would be nan everywhere), a folder of someone else's files."""
    from lrc_src.teachers import TOKENIZER_FILES, teacher_folder

    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "a.txt").write_text("In the beginning " * 200)
    (gz / "b.txt.gz").write_bytes(gzip.compress(b"In the beginning " * 200))
    err = _bad(tmp_path, capsys, "--set", f"data.corpus=['local:{gz}/*']")
    assert "b.txt.gz is not UTF-8 text (byte 0x8b at offset 1)" in err, err

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(teacher_folder("random-llama-micro"), no_tokenizer)
    for name in TOKENIZER_FILES:  # tokenizer_config.json stays: it holds no vocabulary
        (no_tokenizer / name).unlink(missing_ok=True)
    assert (no_tokenizer / "tokenizer_config.json").is_file()
    assert "has no tokenizer" in _bad(tmp_path, capsys, "--set", f"teacher={no_tokenizer}")

    short = tmp_path / "short"
    short.mkdir()
    for i in range(60):  # 60 one-line documents: 1 held out, fewer tokens than one 64-token block
        (short / f"{i:02d}.txt").write_text(f"Verse {i}: and the evening and the morning were the day.")
    err = _bad(tmp_path, capsys, "--set", f"data.corpus=['local:{short}/*']")
    assert "less than one block of data.seq_len=64" in err, err

    mine = tmp_path / "mine"
    (mine / "student").mkdir(parents=True)
    (mine / "student" / "keep.txt").write_text("mine")
    assert main(["train", "--config", str(CI), "--output-dir", str(mine), "--no-progress"]) == 2
    assert "holds files but no run (student)" in capsys.readouterr().err
    assert [p.name for p in mine.rglob("*")] == ["student", "keep.txt"]


def test_vocab_mismatch_fails(tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lrc_src.teachers import teacher_folder

    tok = AutoTokenizer.from_pretrained(teacher_folder("random-llama-micro"))
    folder = tmp_path / "small-vocab"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert "1000" in _bad(tmp_path, capsys, "--set", f"teacher={folder}")


def test_config_types_are_coerced_and_checked():
    cfg = config_from_dict(yaml.safe_load(CI.read_text()), ["train.lr=1e-3", "lrc.clone_terms=[q,gate]"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.lrc.clone_terms == ("q", "gate")
    with pytest.raises(ValueError, match="train.max_steps='many'"):
        config_from_dict(yaml.safe_load(CI.read_text()), ["train.max_steps=many"])
    with pytest.raises(ValueError, match=r"lrc.alhpa"):
        config_from_dict(yaml.safe_load(CI.read_text()), ["lrc.alhpa=0.3"])


def test_a_config_file_gives_the_student_size_and_the_budget():
    """A file without them would otherwise train the dataclasses' defaults (d_S 288, 10 steps)."""
    with pytest.raises(ValueError, match=r"\['lrc.student_hidden_size'\] must be set"):
        config_from_dict({"method": "kd"})
    with pytest.raises(ValueError, match="train.max_steps or train.max_tokens must be set"):
        config_from_dict({"method": "kd"}, ["lrc.student_hidden_size=32"])
    assert config_from_dict({"method": "kd"}, ["lrc.student_hidden_size=32", "train.max_steps=3"]).train.max_steps == 3
    # fine-tuning an exported model has no student size to give
    assert config_from_dict({"method": "sft", "sft": {"model": "m"}, "train": {"max_steps": 1}}).method == "sft"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.betas=[0.9, 0.99, 0.5]"], r"train.betas=\[0.9, 0.99, 0.5\]: expected 2 values"),
        (["train.betas=[0.9]"], "expected 2 values"),
        (["train.betas=[0.9, 1.0]"], r"train.betas=\[0.9, 1.0\] must both be in \[0, 1\)"),
        (["train.warmup_ratio=2"], r"train.warmup_ratio=2.0 must be in \[0, 1\)"),
        (["train.warmup_ratio=-0.1"], "train.warmup_ratio=-0.1"),
        (["train.max_steps=.inf"], "train.max_steps=inf: expected"),
        (["lrc.alpha=[1"], "--set 'lrc.alpha=\\[1': the value is not valid YAML"),
        (["lrc={alpha: 0.5}"], r"config key\(s\) \['lrc.student_hidden_size'\] must be set"),
    ],
)
def test_config_values_that_would_crash_or_mislead_later_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(yaml.safe_load(CI.read_text()), overrides)


def test_config_file_with_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(CI.read_text() + "\nmethod: kd\n")  # CI sets method already
    with pytest.raises(ValueError, match="key 'method' is given twice"):
        load_config(path)
    with pytest.raises(ValueError, match="is a folder; give a .yaml file"):
        load_config(tmp_path)


def test_data_settings_that_would_be_ignored_or_fail_later_are_refused():
    paper = yaml.safe_load((CI.parent / "paper-lrc-1.5b.yaml").read_text())
    with pytest.raises(ValueError, match=r"data.corpus has no effect.*data.mix=null"):
        config_from_dict(paper, ["data.corpus=[kjv]"])
    cfg = config_from_dict(paper, ["data.corpus=[kjv]", "data.mix=null"])
    assert cfg.data.corpus == ["kjv"] and cfg.data.mix is None
    # the budget is train.max_tokens whenever it is set: a max_steps override alone would do nothing
    with pytest.raises(ValueError, match=r"train.max_steps has no effect.*train.max_tokens=null"):
        config_from_dict(paper, ["train.max_steps=20"])
    cfg = config_from_dict(paper, ["train.max_steps=20", "train.max_tokens=null"])
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (20, None)
    with pytest.raises(ValueError, match="data.mix_files .* data.mix, which is not set"):
        ci_cfg("data.mix_files={dclm: x.jsonl}")
    for key in ("data.seed", "train.seed"):
        with pytest.raises(ValueError, match=f"{key}=-1 must be >= 0"):
            ci_cfg(f"{key}=-1")
    # a saved config holds both keys (the corpus at its default): it still loads and matches
    saved = config_from_dict(paper)
    assert saved.data.mix and same_experiment(dump_config(saved), saved)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    from lrc_src import baselines
    from lrc_src.step import NonFiniteLossError

    calls = {"n": 0}
    original = baselines.LRCMethod.forward

    def poisoned(self, input_ids, labels=None):
        out = original(self, input_ids, labels)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(baselines.LRCMethod, "forward", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 4.*checkpoint"):
        train(ci_cfg("train.max_steps=8", "train.save_every=2"), run, progress=False)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (run / "run.json").exists()


def test_export_from_checkpoint_matches_final_student(tmp_path, capsys):
    from safetensors.torch import load_file

    run = train(ci_cfg("train.max_steps=3", "train.save_every=3"), tmp_path / "run", progress=False)
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "exported")]) == 0
    a = load_file(run / "student" / "model.safetensors")
    b = load_file(tmp_path / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    # load_run gives the method (for LRC, the clone) as the checkpoint left it
    from lrc_src.clone import LowRankClone
    from lrc_src.train import load_run

    method, tokenizer = load_run(run)
    assert isinstance(method.clone, LowRankClone) and tokenizer.eos_token_id is not None
    student = method.eval_model()
    assert all(torch.equal(a[k], v) for k, v in student.state_dict().items() if k in a)
    # an existing --output is never replaced: not the run itself, not a file, not a former export
    before = sorted(p.name for p in run.iterdir())
    for taken in (run, run / "metrics.csv", tmp_path / "exported"):
        assert main(["export", "--run", str(run), "--output", str(taken)]) == 2
        assert f"--output {str(taken)!r} exists" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "checkpoint" / "state.json").is_file()
    (run / "checkpoint").rename(run / "checkpoint.old")  # a save cut off between its two renames
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "from_old")]) == 0
    c = load_file(tmp_path / "from_old" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    shutil.rmtree(run / "checkpoint.old")
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "none")]) == 2
    assert "holds no checkpoint/" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["export", "--run", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_intermediate_exports_keep_the_trainable_state(tmp_path):
    """train.export_at writes exports/step_N/ with the student and projections.safetensors (the
    trainable state after step N, keyed as in checkpoint/): Tables 21-22 read it."""
    from safetensors.torch import load_file

    run = train(
        ci_cfg("train.max_steps=3", "train.save_every=3", "train.eval_every=0", "train.export_at=[1,3]"),
        tmp_path / "run",
        progress=False,
    )
    final = load_file(run / "checkpoint" / "trainable.safetensors")
    first = load_file(run / "exports" / "step_1" / "projections.safetensors")
    last = load_file(run / "exports" / "step_3" / "projections.safetensors")
    assert first.keys() == final.keys() == last.keys()
    assert any(k.endswith("layers.0.mlp.up_proj") for k in final)
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert not all(torch.equal(first[k], final[k]) for k in final)
    assert (run / "exports" / "step_1" / "config.json").is_file()


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_accumulation_window_matches_one_process(compiled, tmp_path):
    """2 processes x 2 micro-batches under DDP (weights generated once per step, gradients averaged
    by hand after the window) train the same student as 1 process x 4 micro-batches: the same 4
    batches per step, batch index (step * grad_accum + micro) * processes + rank; eager, and with
    the decoder layers compiled in both runs (the paper profile's launcher compiles on CUDA)."""
    args = ["--config", str(CI), "--set", "train.max_steps=3", "--set", "train.eval_every=0", "--no-progress"]
    args += ["--compile"] if compiled else []
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *args, "--set", "train.grad_accum=4", "--output-dir", str(one)]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lrc_src.cli",
        "train",
        *args,
        "--set",
        "train.grad_accum=2",
        "--output-dir",
        str(two),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["num_processes"] == 2 and info["accumulation_window"] is True and info["compiled_layers"] is compiled
    assert json.loads((one / "run.json").read_text())["accumulation_window"] is True
    # the logged loss and terms are each step's mean over both processes' micro-batches
    for ra, rb in zip(read_metrics(one), read_metrics(two), strict=True):
        for col in ("loss", "lm", "kl", "clone"):
            assert float(rb[col]) == pytest.approx(float(ra[col]), rel=1e-5, abs=1e-6), (ra["step"], col)
    from safetensors.torch import load_file

    sa, sb = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), (k, (sa[k] - sb[k]).abs().max())


@pytest.mark.parametrize("method", ["lrc", "kd"])
def test_compiled_training_follows_eager(method, tmp_path):
    """train.compile=on (torch.compile'd decoder layers) trains like the eager run (fp32; 2
    micro-batches, so LRC's compiled layers take the accumulation window's generated weights); the
    choice is a runtime key, so either run resumes with or without it."""
    from torch._dynamo.utils import counters

    sets = (f"method={method}", "train.max_steps=3", "train.grad_accum=2", "train.mixed_precision='no'")
    cfgs = {flag: ci_cfg(*sets, f"train.compile={flag}") for flag in ("off", "on")}
    runs = {flag: tmp_path / flag for flag in cfgs}
    torch._dynamo.reset()
    counters.clear()
    for flag, out in runs.items():
        train(cfgs[flag], out, progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run did compile
    eager, compiled = read_metrics(runs["off"]), read_metrics(runs["on"])
    assert len(eager) == len(compiled) == 3
    for re_, rc in zip(eager, compiled):
        assert float(rc["loss"]) == pytest.approx(float(re_["loss"]), rel=1e-4), (re_, rc)
    # resuming compares config.yaml without its runtime keys
    assert same_experiment((runs["on"] / "config.yaml").read_text(), cfgs["off"])


@pytest.mark.parametrize("use_kl", [True, False])
def test_tinybert_kl_follows_use_kl(use_kl):
    from conftest import make_teacher

    from lrc_src.factory import build_method

    cfg = ci_cfg(
        "method=tinybert",
        f"baseline.use_kl={str(use_kl).lower()}",
        "baseline.hidden_weight=0.5",
        "baseline.kl_temperature=1.0",
    )
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    out = build_method(cfg, make_teacher(), ids.numpy())(ids)
    terms = out.losses
    assert terms["kl"].item() > 0  # always reported
    want = (
        terms["lm"] + (terms["kl"] if use_kl else 0) + 0.5 * terms["hidden"] + cfg.baseline.attn_weight * terms["attn"]
    )
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


def _tinybert_targets(model, ids):
    """Hidden states and attention maps from forward hooks, not from output_hidden_states /
    output_attentions: the embedding output, each layer's output but the last, the final norm's
    output (the last layer's, normalised, as transformers reports it), and each attention's
    probabilities [B, H, T, T]."""
    hidden, attn, hooks = [], [], []
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, a, o: hidden.append(o)))
    for layer in model.model.layers[:-1]:
        hooks.append(layer.register_forward_hook(lambda m, a, o: hidden.append(o[0] if isinstance(o, tuple) else o)))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: hidden.append(o)))
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o: attn.append(o[1])))
    with torch.no_grad():
        model(input_ids=ids, output_attentions=True)
    for h in hooks:
        h.remove()
    return [h.double() for h in hidden], [a.double() for a in attn]


def test_tinybert_terms_match_naive_reference():
    """TinyBERT's hidden-state term, sum over the L+1 states of MSE(h_S A_i, h_T), and its
    attention term, sum over layers of MSE(attn_S, attn_T), against hooks on both models."""
    from conftest import make_teacher

    from lrc_src.baselines import attention_kernel
    from lrc_src.factory import build_method

    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    method = build_method(ci_cfg("method=tinybert"), make_teacher(), ids.numpy())
    out = method(ids)
    s_hidden, s_attn = _tinybert_targets(method.student, ids)
    with attention_kernel(method.teacher, "eager"):
        t_hidden, t_attn = _tinybert_targets(method.teacher, ids)
    assert len(s_hidden) == len(method.hidden_maps) == 3 and len(s_attn) == 2
    maps = [A.detach().double() for A in method.hidden_maps]
    hidden = sum(((hs @ A - ht) ** 2).mean().item() for hs, ht, A in zip(s_hidden, t_hidden, maps))
    attn = sum(((a_s - a_t) ** 2).mean().item() for a_s, a_t in zip(s_attn, t_attn))
    assert attn > 0
    assert out.losses["hidden"].item() == pytest.approx(hidden, rel=1e-4)
    assert out.losses["attn"].item() == pytest.approx(attn, rel=1e-4)


def test_tinybert_leaves_a_shared_teacher_as_it_was():
    """The teacher runs its eager kernel (for attention maps) only inside TinyBERT's forward: a
    method built on the same teacher afterwards sees the teacher's own kernel and the same loss."""
    from conftest import make_teacher

    from lrc_src.factory import build_method

    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    teacher = make_teacher()
    own = teacher.config._attn_implementation
    assert own != "eager"
    kd_alone = build_method(ci_cfg("method=kd"), teacher, ids.numpy())(ids).loss.item()
    tinybert = build_method(ci_cfg("method=tinybert"), teacher, ids.numpy())
    tinybert(ids).loss.backward()
    assert teacher.config._attn_implementation == own
    assert build_method(ci_cfg("method=kd"), teacher, ids.numpy())(ids).loss.item() == kd_alone


def test_tinybert_trains_through_an_intermediate_export(tmp_path):
    """An export at train.export_at leaves the student's attention maps in the loss (exporting used
    to switch the live student to SDPA, which returns no maps, and the next step failed)."""
    cfg = ci_cfg("method=tinybert", "train.max_steps=4", "train.export_at=[2]", "train.log_every=1")
    run = train(cfg, tmp_path / "tinybert", progress=False)
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["attn"]) > 0 for r in rows), [r["attn"] for r in rows]
    assert (run / "exports" / "step_2" / "model.safetensors").is_file()


def test_one_process_trains_at_one_precision_then_another(tmp_path):
    """accelerate holds one mixed precision per process; without a launcher a finished run does not
    bind the next (a notebook trains fp32, then bf16, then fp32 again)."""
    for i, precision in enumerate(["no", "bf16", "no"]):
        run = train(
            ci_cfg("train.max_steps=1", f"train.mixed_precision='{precision}'"), tmp_path / str(i), progress=False
        )
        assert json.loads((run / "run.json").read_text())["status"] == "complete"
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == precision


def test_tinybert_refuses_to_compile(tmp_path, capsys):
    """tinybert's captured hidden states and attention maps break torch.compile's graphs: a one-line
    error before the run folder is written."""
    err = _bad(tmp_path, capsys, "--set", "method=tinybert", "--compile")
    assert "tinybert cannot be compiled" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_compile_flag_is_train_compile_on(monkeypatch, tmp_path):
    """--compile is train.compile=on (so config.yaml records what the run does), whatever --set
    says; without it the config decides."""
    import lrc_src.train

    seen = {}
    monkeypatch.setattr(lrc_src.train, "train", lambda cfg, out, **kw: seen.update(cfg=cfg, **kw) or Path(out))
    for argv, want in (  # YAML reads on / off as true / false, which train.compile takes alike
        (["--compile"], True),
        ([], load_config(CI).train.compile),
        (["--set", "train.compile=off", "--compile"], True),
        (["--set", "train.compile=off"], False),
    ):
        assert main(["train", "--config", str(CI), "--output-dir", str(tmp_path), *argv]) == 0
        assert seen["cfg"].train.compile == want and seen.get("compile_layers") is None, argv


def test_launches_the_trainer_cannot_serve_are_refused(tmp_path, capsys, monkeypatch):
    """Sharding launchers (DeepSpeed, FSDP) and accelerate's own gradient accumulation are one-line
    errors before the run folder is written: the trainer reads whole parameters (checkpoints, the
    accumulation window, clipping) and scales the gradients by train.grad_accum itself."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lrc_src.train import _check_launch

    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ValueError, match=f"distributed_type {kind.value} shards the parameters"):
            _check_launch(SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=1))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        _check_launch(SimpleNamespace(distributed_type=kind, gradient_accumulation_steps=1))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    err = _bad(tmp_path, capsys, "--set", "train.grad_accum=4")
    assert "accelerate was asked for 4 gradient accumulation steps" in err and "train.grad_accum" in err, err


def test_the_configs_mixed_precision_wins_over_the_launchers_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as accelerate launch --mixed_precision fp16 sets it
    cfg = ci_cfg("train.max_steps=1", "train.eval_every=0", "train.mixed_precision='no'")
    run = train(cfg, tmp_path / "run", progress=False)
    assert json.loads((run / "run.json").read_text())["mixed_precision"] == "no"
    assert "train.mixed_precision=no (the config's) overrides the launcher's fp16" in capsys.readouterr().err


def test_resume_with_another_number_of_processes_is_refused(tmp_path, capsys):
    """A checkpoint records how many data-parallel processes wrote it: each process's batch stream
    and the tokens per step depend on it, so an unfinished run resumes only with as many."""
    from lrc_src.checkpoint import find_checkpoint, read_state

    args = ["--config", str(CI), "--set", "train.max_steps=3", "--set", "train.eval_every=0", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *args, "--output-dir", str(run)]) == 0
    state_file = find_checkpoint(run) / "state.json"
    state = read_state(state_file.parent)
    assert state["processes"] == 1
    # the same run as if two processes had saved it at step 1 and stopped
    state_file.write_text(json.dumps({**state, "step": 1, "processes": 2}))
    (run / "run.json").unlink()
    capsys.readouterr()
    assert main(["train", *args, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "was saved by a run of 2 process(es) and this launch has 1: resume it with 2" in err, err


def test_a_folder_being_trained_is_refused_to_a_second_trainer(tmp_path):
    """While one trainer writes a run folder, a second one for the same folder stops with one
    error line naming the first, and writes nothing; a killed trainer's lock is released with it."""
    args = ["--config", str(CI), "--set", "train.max_steps=100000", "--set", "train.save_every=1", "--no-progress"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrc_src.cli", "train", *args, "--output-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoint" / "state.json").is_file():
            time.sleep(0.05)
        assert proc.poll() is None, "the first trainer stopped"
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        err = second.stderr.strip()
        assert second.returncode == 2 and "\n" not in err and "is being trained by another process" in err, err
        assert f"process {proc.pid} holds" in err, err
        assert proc.poll() is None, "the refused trainer disturbed the first"
    finally:
        proc.kill()
        proc.wait()
    # a killed trainer leaves its lock file, which locks nothing: the next run takes it
    lock = run / ".train.lock"
    assert lock.read_text().strip() == str(proc.pid)
    other = ["--config", str(CI), "--set", "train.max_steps=2", "--no-progress", "--restart-on-config-change"]
    assert main(["train", *other, "--output-dir", str(run)]) == 0
    assert not lock.exists() and len(read_metrics(run)) == 2


def test_a_run_continues_only_with_the_teacher_and_data_it_was_trained_on(tmp_path, capsys):
    """A checkpoint records its teacher and data: an unfinished run whose corpus was edited, or whose
    teacher folder holds other weights, is refused in one line. Export needs no data (a start drawn
    from the data is replaced by the checkpoint), but refuses another teacher."""
    from transformers import AutoModelForCausalLM

    from lrc_src.corpora import load_documents
    from lrc_src.teachers import teacher_folder
    from lrc_src.train import load_run

    teacher, text = tmp_path / "teacher", tmp_path / "text"
    shutil.copytree(teacher_folder("random-llama-micro"), teacher)
    text.mkdir()
    for i, doc in enumerate(load_documents("kjv")[:40]):
        (text / f"{i:02d}.txt").write_text(doc["text"])
    mine = ["--set", f"teacher={teacher}", "--set", f"data.corpus=['local:{text}/*.txt']"]
    runs = {}
    for method in ("lrc", "prune_kd"):  # both start from the data (lrc.init=pca: a PCA of its activations)
        args = ["--config", str(CI), *mine, "--set", f"method={method}", "--set", "lrc.init=pca"]
        args += ["--set", "train.max_steps=3", "--set", "train.keep_optimizer_state=true", "--no-progress"]
        runs[method] = (tmp_path / method, args)
        assert main(["train", *args, "--output-dir", str(tmp_path / method)]) == 0
    run, args = runs["lrc"]
    state_file = run / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert set(state["inputs"]) == {"teacher", "data"}
    state_file.write_text(json.dumps({**state, "step": 1}))  # as if stopped after step 1
    (run / "run.json").unlink()
    capsys.readouterr()

    first = text / "00.txt"
    original = first.read_text()
    first.write_text(original + " And it was so.")
    assert main(["train", *args, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the training data tokenised now is not what it was trained on" in err, err
    first.write_text(original)

    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(teacher)
    assert main(["train", *args, "--output-dir", str(run)]) == 2
    assert "the teacher loaded now is not the one it was trained with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the teacher loaded now"):
        load_run(run)
    # the workflow's choice: a run of other inputs is trained again from the start, like one of another config
    assert main(["train", *args, "--output-dir", str(run), "--restart-on-config-change"]) == 0
    assert [r["step"] for r in read_metrics(run)] == ["1", "2", "3"]
    assert json.loads(state_file.read_text())["inputs"]["teacher"] != state["inputs"]["teacher"]

    shutil.rmtree(text)  # the data is gone: export needs only the teacher and the checkpoint
    for method, (folder, _) in runs.items():
        if method == "prune_kd":  # trained with the first teacher
            shutil.copytree(teacher_folder("random-llama-micro"), teacher, dirs_exist_ok=True)
        assert main(["export", "--run", str(folder), "--output", str(tmp_path / f"{method}-export")]) == 0
        got = load_file(tmp_path / f"{method}-export" / "model.safetensors")
        want = load_file(folder / "student" / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), method


def test_a_hand_off_is_trained_again_when_the_run_it_starts_from_was(tmp_path, capsys):
    """A run started from another run's student (baseline.init_from) records that start: once the
    first run is trained again, the hand-off's checkpoint is refused, or trained again from the new
    start under --restart-on-config-change (the workflow), not finalised as it was."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--config", str(CI), "--set", "train.max_steps=2", "--no-progress"]
    handoff = [*base, "--set", "method=prune_kd", "--set", f"baseline.init_from={first / 'student'}"]
    assert main(["train", *base, "--output-dir", str(first)]) == 0
    assert main(["train", *handoff, "--output-dir", str(second)]) == 0
    before = load_file(second / "student" / "model.safetensors")
    again = [*base, "--set", "lrc.alpha=0.5", "--restart-on-config-change"]
    assert main(["train", *again, "--output-dir", str(first)]) == 0
    (second / "run.json").unlink()  # what snakemake does to a job whose input changed
    capsys.readouterr()
    assert main(["train", *handoff, "--output-dir", str(second)]) == 2
    assert "the student it started from (baseline.init_from) holds other weights now" in capsys.readouterr().err
    assert main(["train", *handoff, "--output-dir", str(second), "--restart-on-config-change"]) == 0
    after = load_file(second / "student" / "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_a_trainer_that_finds_the_folder_written_during_its_setup_checks_it_again(tmp_path, monkeypatch):
    """Two commands into one new folder: the one whose setup ends second finds the other's run there
    once it holds the folder, and refuses a run of another config instead of finalising it as its own."""
    import lrc_src.train as trainer

    out, setup = tmp_path / "run", trainer._setup

    def slow_setup(*args, **kwargs):  # the other command runs to the end meanwhile
        session = setup(*args, **kwargs)
        monkeypatch.setattr(trainer, "_setup", setup)
        train(ci_cfg("train.max_steps=2", "lrc.alpha=0.5"), out, progress=False)
        return session

    monkeypatch.setattr(trainer, "_setup", slow_setup)
    with pytest.raises(ValueError, match="holds a run of a different config"):
        train(ci_cfg("train.max_steps=2"), out, progress=False)
    assert "alpha: 0.5" in (out / "config.yaml").read_text()


def test_handoff_starts_from_the_exported_lrc_student_exactly(tmp_path):
    """The LRC -> KD hand-off: a prune_kd run with baseline.init_from starts from the exported LRC
    student bit for bit (its first logits equal the LRC method's own student's), and with
    train.skip_tokens it trains on the batches after the first phase's."""
    from lrc_src.assets import load_inputs
    from lrc_src.factory import build_method
    from lrc_src.train import Batches

    lrc_cfg = ci_cfg("train.max_steps=3", "lrc.init=pca", "lrc.untie_lm_head=true", "train.save_every=100")
    first = train(lrc_cfg, tmp_path / "lrc", progress=False)
    inputs = load_inputs(lrc_cfg)
    teacher, blocks = inputs.teacher, inputs.train
    lrc = build_method(lrc_cfg, teacher, blocks)  # the first phase's method, at its final trainable state
    state = load_file(first / "checkpoint" / "trainable.safetensors")
    with torch.no_grad():
        for n, p in lrc.trainable_named_parameters():
            p.copy_(state[n])
    tokens = lrc_cfg.train.batch_size * lrc_cfg.data.seq_len * 3
    kd_cfg = ci_cfg(
        "method=prune_kd", f"baseline.init_from={first / 'student'}", f"train.skip_tokens={tokens}", "train.max_steps=2"
    )
    kd = build_method(kd_cfg, teacher, blocks)
    ids = torch.from_numpy(blocks[:2].astype("int64"))
    with torch.no_grad():
        want = lrc.eval_model()(input_ids=ids).logits
        got = kd.student(input_ids=ids).logits
    assert torch.equal(want, got)

    # the second phase's batches continue the first phase's stream
    one = Batches(blocks, lrc_cfg.train.batch_size, lrc_cfg.train.seed)
    two = Batches(blocks, lrc_cfg.train.batch_size, lrc_cfg.train.seed, skip=3)
    assert torch.equal(one.get(3)[0], two.get(0)[0]) and torch.equal(one.get(4)[0], two.get(1)[0])
    run = train(kd_cfg, tmp_path / "kd", progress=False)
    assert len(read_metrics(run)) == 2


def test_handoff_settings_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="has its own start"):
        ci_cfg("method=lrc", "baseline.init_from=somewhere")
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        ci_cfg("method=kd", "train.skip_tokens=3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train(ci_cfg("method=kd", f"baseline.init_from={tmp_path / 'none'}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_config_written_before_a_setting_existed_is_the_same_experiment():

    cfg = ci_cfg()
    saved = yaml.safe_load(dump_config(cfg))
    del saved["train"]["skip_tokens"], saved["baseline"]["init_from"]
    assert same_experiment(yaml.safe_dump(saved), cfg)
    assert not same_experiment(yaml.safe_dump(saved), ci_cfg("train.skip_tokens=1024"))
    saved["train"]["unknown_key"] = 1
    assert not same_experiment(yaml.safe_dump(saved), cfg)
