"""The exported student's model card: written from the run's files, loadable by huggingface_hub."""

import json

import pytest
from conftest import make_teacher
from huggingface_hub import ModelCard

from lrc_src.card import model_card, run_of_student, write_model_card
from lrc_src.config import ExperimentConfig, dump_config


def _run_folder(tmp_path, method="lrc", evals=None, software=None, **settings):
    run = tmp_path / f"run-{method}"
    make_teacher().save_pretrained(run / "student")
    cfg = ExperimentConfig(method=method, **settings)
    (run / "config.yaml").write_text(dump_config(cfg))
    info = {"status": "complete", "method": method, "steps": 30, "tokens": 30720, "trainable_parameters": 1234}
    (run / "run.json").write_text(json.dumps({**info, **({"software": software} if software else {})}))
    (run / "metrics.csv").write_text("step,tokens,loss,heldout_loss\n10,10240,9.0,8.5\n30,30720,7.0,6.25\n")
    if evals:
        (run / "student" / "evals").mkdir()
        (run / "student" / "evals" / "tiny.csv").write_text(evals)
    return run


def test_card_front_matter_and_numbers_come_from_the_run(tmp_path):
    run = _run_folder(tmp_path)
    card = ModelCard.load(write_model_card(run))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"distillation", "low-rank-clone"} <= set(card.data.tags)
    assert card.data.datasets is None and "| training data | python-docs |" in card.text  # no hub dataset
    assert "| tokens trained | 30720 (30 optimizer steps) |" in card.text
    assert "6.2500" in card.text  # the last held-out loss of metrics.csv
    assert "Evaluation" not in card.text
    assert "Framework versions" not in card.text  # a run.json from before it was recorded


def test_card_lists_the_stack_its_run_json_records(tmp_path):
    software = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.25.0", "device": "AMD EPYC 9R14"}
    card = ModelCard.load(write_model_card(_run_folder(tmp_path, software=software)))
    versions = card.text.split("## Framework versions")[1].split("## Use")[0]
    assert [line for line in versions.splitlines() if line.startswith("- ")] == [
        "- python: 3.11.7",
        "- torch: 2.13.0+cpu",
        "- transformers: 5.25.0",
        "- device: AMD EPYC 9R14",
    ]


def test_card_shows_the_evaluation_once_there_is_one(tmp_path):
    evals = "model,suite,task,metric,value,stderr,num_fewshot,limit,n\nlrc,tiny,tiny_mmlu,acc,0.25,0.0433,0,,100\n"
    card = model_card(_run_folder(tmp_path, evals=evals))
    assert "| tiny | tiny_mmlu | acc | 0.2500 | 0.0433 |" in card
    assert "--limit" not in card
    limited = evals.replace("0,,100", "0,4,4")  # a smoke test says so under its numbers
    card = model_card(_run_folder(tmp_path / "limited", evals=limited))
    assert "The tiny suite was scored on at most 4 documents per task (`lrc eval --limit`)" in card


def test_card_of_a_baseline_and_bad_folders(tmp_path):
    card = model_card(_run_folder(tmp_path, method="kd"))
    assert "logit knowledge distillation" in card and "low-rank-clone" not in card
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        model_card(tmp_path / "nothing")
    run = _run_folder(tmp_path, method="scratch")
    (run / "student" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no exported student"):
        model_card(run)


def test_run_of_student(tmp_path):
    run = _run_folder(tmp_path)
    assert run_of_student(run / "student") == run.resolve()
    assert run_of_student(tmp_path) is None


def test_lrc_eval_keeps_its_table_beside_the_student_and_updates_the_card(tmp_path):
    import pandas as pd

    from lrc_src.harness import update_student_card

    run = _run_folder(tmp_path)
    frame = pd.DataFrame(
        [
            {
                "model": "lrc",
                "suite": "tiny",
                "task": "tiny_mmlu",
                "metric": "acc",
                "value": 0.3,
                "stderr": 0.05,
                "num_fewshot": 0,
                "limit": float("nan"),
                "n": 100,
            }
        ]
    )
    card = update_student_card(run / "student", frame)
    assert card == run / "student" / "README.md"
    assert (run / "student" / "evals" / "tiny.csv").is_file()
    assert "| tiny | tiny_mmlu | acc | 0.3000 | 0.0500 |" in ModelCard.load(card).text
    assert update_student_card(tmp_path, frame) is None  # not a run's student: nothing written


def test_card_claims_only_what_can_be_known(tmp_path):
    """base_model only for a hub id, a licence only where the origin states one, hub datasets only;
    scratch inherits nothing, and an SFT card names the model it fine-tuned."""
    from lrc_src.config import DataConfig, SFTConfig

    def meta(name, method="lrc", **settings):
        return ModelCard.load(write_model_card(_run_folder(tmp_path / name, method=method, **settings))).data

    random_teacher = meta("random", teacher="random-llama-micro")
    assert random_teacher.base_model is None and random_teacher.license is None
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: someone/else\n---\n# a teacher\n")
    local = meta("local", teacher=str(folder))
    assert local.base_model is None and local.license == "mit"
    hub = meta("hub", teacher="acme/not-in-the-cache")
    assert hub.base_model == "acme/not-in-the-cache" and hub.license is None
    qwen = meta("qwen", teacher="Qwen/Qwen2.5-3B")
    assert (qwen.license, qwen.license_name) == ("other", "qwen-research") and qwen.license_link.startswith("https://")
    mix = meta("mix", data=DataConfig(mix={"fineweb_edu": 1.0, "dclm": 1.0}))
    assert mix.datasets and all("/" in d for d in mix.datasets)
    scratch = meta("scratch", method="scratch")
    assert scratch.base_model is None and scratch.license is None and "distillation" not in scratch.tags
    sft = ModelCard.load(
        write_model_card(
            _run_folder(
                tmp_path / "sft",
                method="sft",
                sft=SFTConfig(model=str(folder), chat_data="hub:HuggingFaceH4/ultrachat_200k"),
            )
        )
    )
    assert sft.data.datasets == ["HuggingFaceH4/ultrachat_200k"] and sft.data.license == "mit"
    assert f"Fine-tuned from `{folder}`" in sft.text and "distillation" not in sft.data.tags
