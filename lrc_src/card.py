"""The model card of an exported student: `student/README.md`, written from the run's own files.

A student folder that leaves the run (pushed to the hub, copied to a shared drive) should say what
it is: which teacher it was distilled from and under which licence (only what can be known: a
base_model is a hub id, a licence one its origin states), by which method and settings,
on how many tokens of what data, and how it scores. Everything in the card is read from the run
folder (`config.yaml`, `run.json`, `metrics.csv`) and, once `lrc eval` has scored the student,
from the evaluation tables it keeps beside the weights (`student/evals/<suite>.csv`); nothing is
typed by hand. The front matter follows the Hugging Face model-card metadata, so
`huggingface_hub.ModelCard.load("student/README.md")` reads it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from lrc_src.fileio import atomic_write_text

CARD_NAME = "README.md"
EVALS_DIR = "evals"  # inside the student folder: one CSV per suite, written by `lrc eval`

# The teachers this project names: their hub id (the student's base_model) and licence metadata.
KNOWN_TEACHERS = {
    "smollm2-135m-instruct": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "meta-llama/Llama-3.2-3B-Instruct": {"base_model": "meta-llama/Llama-3.2-3B-Instruct", "license": "llama3.2"},
    "Qwen/Qwen2.5-3B": {
        "base_model": "Qwen/Qwen2.5-3B",
        "license": "other",
        "license_name": "qwen-research",
        "license_link": "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE",
    },
    "Qwen/Qwen2.5-7B": {"base_model": "Qwen/Qwen2.5-7B", "license": "apache-2.0"},
}
LICENCE_KEYS = ("license", "license_name", "license_link")
DISTILLATION = ("lrc", "kd", "tinybert", "prune_kd")  # the methods that learn from the teacher
METHOD_NAMES = {
    "lrc": "Low-Rank Clone (LRC; Hao et al., arXiv 2505.12781)",
    "scratch": "training from scratch (LM loss only)",
    "kd": "logit knowledge distillation (KL + LM)",
    "tinybert": "TinyBERT-style distillation (hidden states, attention maps, KL + LM)",
    "prune_kd": "hard pruning of the hidden size, then logit distillation (KL + LM)",
    "sft": "supervised fine-tuning on chat data",
}


def _licence_of(card: Path | str | None) -> dict:
    """The licence fields of a model card's front matter (none when there is no card)."""
    if card is None or not Path(card).is_file():
        return {}
    text = Path(card).read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    return {k: meta[k] for k in LICENCE_KEYS if meta.get(k)}


def _is_hub_id(name: str) -> bool:
    return "/" in name and not Path(name).exists()


def origin_metadata(model: str) -> dict:
    """base_model and licence fields for a student derived from `model` (a config's teacher or
    sft.model). base_model only when it is a hub id; the licence from the names this project
    knows, else from the model's own card (a local folder, or the hub's copy in the local cache);
    nothing that cannot be known (a random test teacher, a folder without a card)."""
    if model in KNOWN_TEACHERS:
        return dict(KNOWN_TEACHERS[model])
    if _is_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, CARD_NAME)
        return {"base_model": model, **_licence_of(cached if isinstance(cached, str) else None)}
    return _licence_of(Path(model) / CARD_NAME) if Path(model).is_dir() else {}


def _training_data(cfg: dict) -> tuple[str, list[str]]:
    """What the run trained on, in words, and its hub datasets (the card's `datasets`)."""
    if cfg["method"] == "sft":
        chat = str(cfg.get("sft", {}).get("chat_data") or "")
        return chat, [chat[len("hub:") :]] if chat.startswith("hub:") else []
    data = cfg["data"]
    if data.get("mix"):
        from lrc_src.mix import PAPER_SOURCES

        hub = sorted({PAPER_SOURCES[n].dataset for n in data["mix"] if n in PAPER_SOURCES})
        return "mix " + ", ".join(f"{n}: {w}" for n, w in data["mix"].items()), hub
    corpus = data.get("corpus") or []
    corpus = [corpus] if isinstance(corpus, str) else list(corpus)
    return " + ".join(corpus), []


def _final_heldout_loss(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    with metrics.open() as f:
        values = [r.get("heldout_loss", "") for r in csv.DictReader(f)]
    values = [float(v) for v in values if v not in ("", None)]
    return values[-1] if values else None


def _eval_rows(student: Path) -> list[dict]:
    rows = []
    for path in sorted((student / EVALS_DIR).glob("*.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def _fmt(value) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if math.isnan(x) else f"{x:.4f}"


def _settings(cfg: dict) -> list[tuple[str, object]]:
    t, lrc = cfg["train"], cfg.get("lrc", {})
    rows = [
        ("method", cfg["method"]),
        ("fine-tuned from", cfg["sft"]["model"]) if cfg["method"] == "sft" else ("teacher", cfg["teacher"]),
        ("sequence length", cfg["data"]["seq_len"]),
        ("learning rate", t["lr"]),
        ("batch", f"{t['batch_size']} x {t['grad_accum']} micro-batches"),
        ("warmup ratio", t["warmup_ratio"]),
        ("seed", t["seed"]),
    ]
    if cfg["method"] == "lrc":
        rows += [
            ("student hidden size", lrc.get("student_hidden_size")),
            ("alpha (clone weight)", lrc.get("alpha")),
            ("KL temperature", lrc.get("kl_temperature")),
            ("projection init", lrc.get("init")),
        ]
    else:
        rows += [("KL temperature", cfg.get("baseline", {}).get("kl_temperature"))]
    if cfg.get("baseline", {}).get("init_from"):  # the second phase of a hand-off
        rows += [
            ("started from", f"`{cfg['baseline']['init_from']}`"),
            ("tokens of the earlier phase (batches skipped)", t.get("skip_tokens", 0)),
        ]
    return rows


def model_card(run_dir: str | Path, info: dict | None = None) -> str:
    """The card's text for the student of `run_dir` (a folder written by `lrc train`); `info`: its
    run.json record (default: read from the folder; the trainer passes it before writing it)."""
    run = Path(run_dir)
    for name in ("config.yaml", "run.json") if info is None else ("config.yaml",):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{str(run)!r} is not a finished run folder (no {name})")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    info = json.loads((run / "run.json").read_text()) if info is None else info
    student = run / "student"
    if not (student / "config.json").is_file():
        raise FileNotFoundError(f"run folder {str(run)!r} has no exported student (student/config.json)")
    method = cfg["method"]
    origin = cfg["sft"]["model"] if method == "sft" else cfg["teacher"]
    # scratch learns nothing from the teacher's weights or outputs: no base model, no inherited licence
    upstream = origin_metadata(origin) if method != "scratch" else {}
    data_text, hub_datasets = _training_data(cfg)
    meta = {
        **({"base_model": upstream["base_model"]} if "base_model" in upstream else {}),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        **{k: upstream[k] for k in LICENCE_KEYS if k in upstream},
        "tags": ["lrc-replication", method, *(["distillation"] if method in DISTILLATION else [])]
        + (["low-rank-clone"] if method == "lrc" else []),
        **({"datasets": hub_datasets} if hub_datasets else {}),
    }
    origin_name = upstream.get("base_model", origin)
    if method == "sft":
        what = f"Fine-tuned from `{origin}` with {METHOD_NAMES['sft']}"
    elif method == "scratch":
        what = f"Trained from scratch (LM loss only) in the shape of a student of {origin_name}"
    else:
        what = f"A student of {origin_name}, distilled with {METHOD_NAMES.get(method, method)}"
    heldout = _final_heldout_loss(run / "metrics.csv")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {run.name}",
        "",
        f"{what}, by `lrc train` (lrc-replication). This card was written from the run folder's own files.",
        "",
        "| | |",
        "|---|---|",
        f"| tokens trained | {info.get('tokens', '')} ({info.get('steps', '')} optimizer steps) |",
        f"| training data | {data_text} |",
        f"| trainable parameters | {info.get('trainable_parameters', '')} |",
        f"| held-out loss (nats/token, end of training) | {_fmt(heldout) if heldout is not None else 'n/a'} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in _settings(cfg)]
    evals = _eval_rows(student)
    if evals:
        lines += [
            "",
            "## Evaluation (`lrc eval`)",
            "",
            "| suite | task | metric | value | stderr |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.get('suite', '')} | {r.get('task', '')} | {r.get('metric', '')} | {_fmt(r.get('value'))} "
            f"| {_fmt(r.get('stderr'))} |"
            for r in evals
        ]
        limited = sorted({(r.get("suite", ""), r["limit"]) for r in evals if r.get("limit") not in (None, "")})
        lines += [
            f"\nThe {suite} suite was scored on at most {limit} documents per task (`lrc eval --limit`): a "
            "smoke test, not a result."
            for suite, limit in limited
        ]
    if info.get("software"):  # run folders finished before it was recorded have none
        lines += ["", "## Framework versions", "", "The stack that finished the run (its `run.json`):", ""]
        lines += [f"- {k}: {v}" for k, v in info["software"].items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/student")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/student")',
        "```",
        "",
        "A plain `transformers` model: no custom code is needed to load or run it.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, info: dict | None = None) -> Path:
    """Write (or refresh) `run_dir/student/README.md` (`info`: see `model_card`); returns its path."""
    text = model_card(run_dir, info)
    return atomic_write_text(Path(run_dir) / "student" / CARD_NAME, text)


def run_of_student(model_dir: str | Path) -> Path | None:
    """The run folder whose exported student `model_dir` is, or None (e.g. a teacher folder)."""
    folder = Path(model_dir).resolve()
    run = folder.parent
    if folder.name == "student" and (run / "config.yaml").is_file() and (run / "run.json").is_file():
        return run
    return None
