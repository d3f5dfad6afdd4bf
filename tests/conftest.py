"""Shared fixtures: tiny random teachers on CPU, seeded."""

import csv as _csv
import os as _os
from pathlib import Path as _Path

if _os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one torch thread each, set before torch
    # loads so that the subprocesses a test starts inherit it. A test that compares an in-process
    # run with a subprocess run (kill and resume) needs both on the same thread count, since the
    # thread count changes how float sums are split.
    _os.environ["OMP_NUM_THREADS"] = "1"
    # The workers, the ci DAG's jobs and the tests' subprocesses together ask for more threads than
    # there are cores; OpenMP threads that spin while they wait would take the cores from the others.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 101


def make_teacher(kind: str = "llama-gqa-tied", seed: int = 0):
    """A tiny random teacher (d_T 64, 2 layers, head_dim 16) of the named shape."""
    torch.manual_seed(seed)
    base = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if kind == "llama-gqa-tied":
        model = LlamaForCausalLM(LlamaConfig(**base, tie_word_embeddings=True))
    elif kind == "llama-mqa-untied":
        model = LlamaForCausalLM(LlamaConfig(**{**base, "num_key_value_heads": 1}, tie_word_embeddings=False))
    elif kind == "llama-bias":  # Llama's optional attention/MLP biases, incl. o_proj and down_proj
        model = LlamaForCausalLM(LlamaConfig(**base, attention_bias=True, mlp_bias=True, tie_word_embeddings=False))
    elif kind == "qwen2-bias":
        model = Qwen2ForCausalLM(Qwen2Config(**base, tie_word_embeddings=True))
    elif kind == "llama3-rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        model = LlamaForCausalLM(LlamaConfig(**base, rope_parameters=rope, tie_word_embeddings=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**base, sliding_window=None, tie_word_embeddings=False))
    elif kind == "mistral-window":  # Mistral-7B-v0.1's sliding window, scaled down to 8 tokens
        model = MistralForCausalLM(MistralConfig(**base, sliding_window=8, tie_word_embeddings=False))
    else:
        raise KeyError(kind)
    # random norm weights so that folding them matters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def read_metrics(run) -> list[dict]:
    """A run folder's metrics.csv, one dict of strings per row."""
    with open(_Path(run) / "metrics.csv") as f:
        return list(_csv.DictReader(f))


def assert_same_run(a, b, steps: int, files=("student/model.safetensors",)) -> None:
    """Two run folders hold the same numbers: `steps` rows of metrics.csv each, equal but for the
    timing columns, and each named safetensors file equal tensor for tensor."""
    from safetensors.torch import load_file

    from lrc_src.train import TIMING_COLUMNS

    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) == steps
    for x, y in zip(ra, rb):
        assert {c: v for c, v in x.items() if c not in TIMING_COLUMNS} == {
            c: v for c, v in y.items() if c not in TIMING_COLUMNS
        }, x["step"]
    for f in files:
        sa, sb = load_file(_Path(a) / f), load_file(_Path(b) / f)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 19), generator=g)


@pytest.fixture
def connections(monkeypatch):
    """The addresses this test's code tried to connect to (each connection still happens): a check
    on how often the hub is asked, where a timing would depend on the machine. The process's cached
    hub probe is forgotten before and after, so the test's own probe is counted."""
    import socket

    from lrc_src import hub

    hub._probe_endpoint.cache_clear()
    tried = []
    connect = socket.socket.connect

    def counted(sock, address):
        tried.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    yield tried
    hub._probe_endpoint.cache_clear()


# One asset cache for the whole test session (teacher conversions, corpora, token caches), kept
# in the repo's gitignored .lrc_cache unless the caller set LRC_CACHE.

_os.environ.setdefault("LRC_CACHE", str(_Path(__file__).resolve().parents[1] / ".lrc_cache"))
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `make test-fast` skips these: whole-program runs (the workflow, the benchmark script), subprocess
# kills, multi-process training and torch.compile, which take most of `make test`'s time.
INTEGRATION_MODULES = {"test_workflow.py", "test_benchmark.py"}
INTEGRATION_WORDS = ("compile", "kill", "ddp", "freed_memory", "end_to_end")


# `make test` hands whole files to its workers in collection order (--dist loadfile
# --no-loadscope-reorder): the longest files and those with a slow start go first, so that none
# of them starts last and runs alone at the end. test_workflow.py holds the ci DAG, the longest
# single test; test_teachers.py converts the SmolLM2 teacher once (about 15 s) before its first test.
FIRST_FILES = (
    "test_workflow.py",
    "test_train.py",
    "test_benchmark.py",
    "test_clone.py",
    "test_checkpoint.py",
    "test_data.py",
    "test_teachers.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES or any(w in item.name for w in INTEGRATION_WORDS):
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within
