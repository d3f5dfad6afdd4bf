"""The paper profile's training data: a weighted mix of hub datasets, streamed.

The paper trains on Fineweb-Edu (``int_score >= 4``), DCLM, Cosmopedia-v2 and OpenHermes-2.5.
:func:`paper_mix_documents` streams documents ``{"text", "source"}`` from each source (or from a
local stand-in file with the hub schema), shuffles each stream with a seeded buffer and
interleaves them by weight; OpenHermes conversations are rendered with the teacher's chat
template. Pass a mapping ``{"mix": {"fineweb_edu": 18, ...}, "data_files": {...}}`` as the corpus
of :func:`lrc_src.packing.prepare_data` to train on it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrc_src.fileio import iter_jsonl, sha256_file
from lrc_src.hub import hub_offline_reason


@dataclass(frozen=True)
class HubSource:
    """One hub dataset of the paper's training mix."""

    dataset: str
    config: str | None = None
    kind: str = "text"  # "text": use the ``text`` field; "chat": render ``conversations``
    min_int_score: int | None = None  # keep records with int_score >= this (Fineweb-Edu)

    @property
    def label(self) -> str:
        return self.dataset + (f" (config {self.config})" if self.config else "")


PAPER_SOURCES: dict[str, HubSource] = {
    "fineweb_edu": HubSource("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", min_int_score=4),
    "dclm": HubSource("mlfoundations/dclm-baseline-1.0"),
    "cosmopedia_v2": HubSource("HuggingFaceTB/smollm-corpus", "cosmopedia-v2"),
    "openhermes": HubSource("teknium/OpenHermes-2.5", kind="chat"),
}
OPENHERMES_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Documents each source's streaming shuffle buffer holds (a mix spec's "shuffle_buffer" overrides it).
SHUFFLE_BUFFER = 10_000


def paper_mix_documents(
    mix: Mapping[str, float],
    tokenizer=None,
    seed: int = 0,
    data_files: Mapping[str, str | os.PathLike] | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[dict]:
    """Stream documents ``{"text", "source"}`` of the paper's mix, interleaved by weight.

    Args:
        mix: source name -> weight, e.g. ``{"fineweb_edu": 18, "dclm": 2, "cosmopedia_v2": 1,
            "openhermes": 0.5}``; names are keys of :data:`PAPER_SOURCES`; weight 0 drops a source.
        tokenizer: the teacher tokenizer, whose chat template renders OpenHermes conversations
            (required when ``openhermes`` has a positive weight).
        seed: seeds the per-source shuffle buffers and the interleaving draw.
        data_files: optional local stand-in per source (``.jsonl`` or ``.parquet`` with the hub
            schema), used instead of the hub.
        shuffle_buffer: per-source streaming shuffle buffer (0 disables it).

    Each step draws a source with probability proportional to its weight (numpy generator
    seeded by ``seed``, sources in name order, so listing them otherwise changes nothing); the
    stream ends when any source is exhausted (no repetition). Every source is opened before this
    returns, so an offline hub fails at once with a ``FileNotFoundError`` naming the dataset.
    """
    data_files = dict(data_files or {})
    weights = mix_weights(mix, data_files)
    if "openhermes" in weights and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("mix source 'openhermes' needs a tokenizer with a chat template to render conversations")

    names = sorted(weights)  # the stream depends on the weights, not on the order they are listed in
    streams = [_source_records(name, data_files.get(name), tokenizer, seed, shuffle_buffer) for name in names]
    p = np.array([weights[n] for n in names]) / sum(weights.values())
    return _interleave(names, streams, p, seed)


def mix_weights(mix: Mapping[str, Any], data_files: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The positive weights of a mix spec, after checking its sources are known (also those of
    ``data_files``) and every weight is a finite number >= 0, with one positive."""
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"mix must be a non-empty mapping source -> weight, got {mix!r}")
    unknown = sorted(set(mix) - set(PAPER_SOURCES)) + sorted(set(data_files or {}) - set(PAPER_SOURCES))
    if unknown:
        raise ValueError(f"unknown mix source(s) {unknown}; known: {', '.join(PAPER_SOURCES)}")
    weights = {}
    for name, w in mix.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mix weight of {name!r} must be a finite number >= 0, got {w!r}")
        if w > 0:
            weights[name] = float(w)
    if not weights:
        raise ValueError(f"mix {dict(mix)!r} has no positive weight")
    return weights


def _interleave(names: list[str], streams: list[Iterator[dict]], p: np.ndarray, seed: int) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    while True:
        i = int(rng.choice(len(names), p=p))
        try:
            yield next(streams[i])
        except StopIteration:
            return


def _source_records(name: str, local: str | os.PathLike | None, tokenizer, seed: int, shuffle_buffer: int):
    """Open one source (local stand-in or hub, streaming) and return an iterator of documents."""
    import datasets

    src = PAPER_SOURCES[name]
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data_files for mix source {name!r}: {str(path)!r} does not exist")
        if path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"data_files for {name!r} must be .jsonl or .parquet, got {str(path)!r}")
        # Read directly (datasets' parquet streaming sleeps 5 s on every close) but keep the
        # IterableDataset wrapper so the shuffle below is the same as for the hub.
        ds = datasets.IterableDataset.from_generator(_read_local_records, gen_kwargs={"path": str(path)})
    else:
        reason = hub_offline_reason(datasets=True)
        if reason is not None:
            raise FileNotFoundError(
                f"mix source {name!r} streams the hub dataset {src.label} but the hub is offline "
                f"({reason}); give a local stand-in via data_files or run on a connected machine"
            )
        ds = datasets.load_dataset(src.dataset, src.config, split="train", streaming=True)
    if shuffle_buffer > 0:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return _records_to_documents(name, src, ds, tokenizer)


def _read_local_records(path: str) -> Iterator[dict]:
    """Records of a local ``.jsonl`` (one JSON object a line) or ``.parquet`` stand-in file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        yield from iter_jsonl(path)


def _records_to_documents(name: str, src: HubSource, records: Iterable[dict], tokenizer) -> Iterator[dict]:
    for rec in records:
        if src.min_int_score is not None:
            score = rec.get("int_score", (rec.get("metadata") or {}).get("int_score"))
            if score is None:
                raise ValueError(f"mix source {name!r} ({src.label}): record has no int_score to filter on")
            if int(score) < src.min_int_score:
                continue
        field_ = "conversations" if src.kind == "chat" else "text"
        if field_ not in rec:
            raise ValueError(f"mix source {name!r} ({src.label}): a record has no {field_!r} field")
        text = render_conversation(rec[field_], tokenizer) if src.kind == "chat" else rec[field_]
        if text and text.strip():
            yield {"text": text, "source": name}


def render_conversation(conversation: Sequence[Mapping[str, str]], tokenizer) -> str:
    """Render one OpenHermes conversation (``from``/``value`` turns) with the chat template."""
    messages = []
    for turn in conversation:
        role = OPENHERMES_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"OpenHermes turn has unknown role {turn['from']!r}; known: {sorted(OPENHERMES_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return tokenizer.apply_chat_template(messages, tokenize=False)


# ============================================================================================
# A mix as the corpus of lrc_src.packing.prepare_data
# ============================================================================================


def mix_source_key(corpus: Mapping[str, Any], max_train_tokens: int | None, tokenizer=None) -> dict:
    """What decides a mix corpus's documents, for the token cache key: the weights, each source's
    hub dataset or local file (path and sha256), the shuffle buffer and, with a chat source, the
    tokenizer's chat template that renders it. Checks the spec (keys, sources, weights) and that
    a mix streaming from the hub is bounded by ``max_train_tokens``."""
    extra = set(corpus) - {"mix", "data_files", "shuffle_buffer"}
    if "mix" not in corpus or extra:
        raise ValueError(
            f"a mix corpus needs a 'mix' key and may have 'data_files', 'shuffle_buffer'; got keys {sorted(corpus)}"
        )
    files = dict(corpus.get("data_files") or {})
    mix_weights(corpus["mix"], files)  # checked here; the key keeps every weight, zeros included
    mix = {k: float(v) for k, v in dict(corpus["mix"]).items()}
    from_hub = [n for n, w in mix.items() if w > 0 and n not in files]
    if from_hub and max_train_tokens is None:
        raise ValueError(f"a mix streaming {from_hub} from the hub is unbounded: set max_train_tokens")
    sources = {}
    for name in sorted(mix):
        if name in files:
            path = Path(files[name]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data_files for mix source {name!r}: {str(path)!r} does not exist")
            sources[name] = {"data_files": str(path.resolve()), "sha256": sha256_file(path)}
        elif name in PAPER_SOURCES:
            sources[name] = {"hub": PAPER_SOURCES[name].label}
    key = {"mix": mix, "sources": sources, "shuffle_buffer": int(corpus.get("shuffle_buffer", SHUFFLE_BUFFER))}
    if any(PAPER_SOURCES[n].kind == "chat" and w > 0 for n, w in mix.items()):
        template = getattr(tokenizer, "chat_template", None) or ""
        key["chat_template_sha256"] = hashlib.sha256(str(template).encode()).hexdigest()
    return key


def open_mix(corpus: Mapping[str, Any], tokenizer, seed: int) -> Iterator[dict]:
    """The document stream of a mix corpus ``{"mix": ..., "data_files": ..., "shuffle_buffer": ...}``."""
    return paper_mix_documents(
        corpus["mix"],
        tokenizer,
        seed=seed,
        data_files=corpus.get("data_files"),
        shuffle_buffer=int(corpus.get("shuffle_buffer", SHUFFLE_BUFFER)),
    )
