"""Sample generations: a fixed prompt set, greedy continuations, the same table on every run."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lrc_src.cli import main
from lrc_src.samples import INSTRUCTIONS, sample_prompts, samples_frame
from lrc_src.teachers import smollm2_tokenizer


@pytest.fixture
def heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    docs = [" ".join(f"word{i}_{j}" for j in range(60)) for i in range(6)] + ["too short"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def model_dir(tmp_path):
    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    folder = tmp_path / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prompts_are_fixed_by_the_seed(heldout):
    a, b = (
        sample_prompts(heldout, n_heldout=3, words=10, seed=1),
        sample_prompts(heldout, n_heldout=3, words=10, seed=1),
    )
    assert a == b and len(a) == 3 + len(INSTRUCTIONS)
    assert [p["kind"] for p in a] == ["heldout"] * 3 + ["instruction"] * len(INSTRUCTIONS)
    assert all(len(p["prompt"].split()) == 10 for p in a[:3])
    assert sample_prompts(heldout, n_heldout=3, words=10, seed=2)[:3] != a[:3]
    with pytest.raises(ValueError, match="need 7"):
        sample_prompts(heldout, n_heldout=7, words=10)


def test_samples_table_is_deterministic(heldout, model_dir, tmp_path):
    prompts = sample_prompts(heldout, n_heldout=1, words=8, instructions=INSTRUCTIONS[:1])
    one = samples_frame({"a": model_dir, "b": model_dir}, prompts, max_new_tokens=3)
    assert list(one.columns) == ["model", "kind", "prompt", "output"] and len(one) == 4
    assert one.loc[one.model == "a", "output"].tolist() == one.loc[one.model == "b", "output"].tolist()
    assert samples_frame({"a": model_dir}, prompts, max_new_tokens=3).equals(one[one.model == "a"])
    assert (
        main(
            [
                "samples",
                "--model",
                f"a={model_dir}",
                "--heldout",
                str(heldout),
                "--heldout-prompts",
                "1",
                "--instructions",
                "1",
                "--max-new-tokens",
                "3",
                "--output",
                str(tmp_path / "s.csv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s.csv").read_text().count("\n") >= 3


def test_samples_bad_input_is_one_line(heldout, tmp_path, capsys):
    out = tmp_path / "x.csv"  # never written: every call fails before any output
    assert main(["samples", "--model", f"a={tmp_path}", "--heldout", str(heldout), "--output", str(out)]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["samples", "--model", "a", "--heldout", str(heldout), "--output", str(out)]) == 2
    assert not out.exists()
    twice = ["--model", f"a={tmp_path}", "--model", f"a={tmp_path}/other"]
    assert main(["samples", *twice, "--heldout", str(heldout), "--output", str(out)]) == 2
    assert "the name 'a' is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "samples",
                "--model",
                f"a={tmp_path}",
                "--instructions",
                "-1",
                "--heldout",
                str(heldout),
                "--output",
                str(out),
            ]
        )
    assert "--instructions: expected an integer >= 0, got '-1'" in capsys.readouterr().err
    # an --output that cannot be a file, and held-out rows without text, before any model loads
    good = ["samples", "--model", f"a={tmp_path}", "--heldout", str(heldout)]
    assert main([*good, "--output", str(tmp_path)]) == 2
    assert "cannot be written as a file: it is a folder" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert main(["samples", "--model", f"a={tmp_path}", "--heldout", str(rows), "--output", str(out)]) == 2
    assert 'rows.jsonl:2: expected {"text": "..."}' in capsys.readouterr().err
    assert not out.exists()
