"""Tokenisation, the held-out split and packing into fixed-length blocks, cached on disk.

:func:`prepare_data` tokenises every document of a corpus (:mod:`lrc_src.corpora`) or a streamed
mix (:mod:`lrc_src.mix`) with the teacher tokenizer (no special tokens, then BOS in front only if
the tokenizer adds one by default, e.g. Llama-3, and EOS after each document), concatenates and
cuts the stream into ``seq_len`` blocks (the tail is dropped; no cross-document attention mask, as
in the paper). The held-out split is by DOCUMENT, decided before tokenisation, so held-out text is
never in a training block; a list spec holds out, of each of its parts, the documents that part
holds out alone, so a run on ``[a, b]`` never trains on ``a``'s held-out documents (Table 4 scores
runs on each corpus's held-out set). Training blocks are shuffled by seed. Results are cached as
uint32 ``.npy`` files (opened as memmaps) under ``cache_dir()/tokens/<key>/``, the key a hash of
everything that decides their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from lrc_src.corpora import (
    documents_sha256,
    flatten_parts,
    load_document_parts,
    spec_parts,
    write_jsonl,
)
from lrc_src.fileio import rename_into_place
from lrc_src.mix import mix_source_key, open_mix
from lrc_src.teachers import cache_dir

CorpusSpec = Union[str, Sequence[str], Mapping[str, Any]]

# Part of every cache key: bump it whenever the bytes of a packed block or the split could change.
FORMAT_VERSION = 2


@dataclass
class PackedData:
    """Packed token blocks of one corpus for one tokenizer/seq_len/seed.

    Attributes:
        train: uint32 ``[N, seq_len]`` training blocks (read-only memmap), shuffled by seed.
        heldout: uint32 ``[M, seq_len]`` blocks packed from the held-out documents only.
        heldout_path: jsonl of the held-out documents (``{"text", "source"}``), for lm-eval.
        meta: provenance and counts (also in ``directory/meta.json``).
        directory: the cache folder holding all of the above.
    """

    train: np.ndarray
    heldout: np.ndarray
    heldout_path: Path
    meta: dict = field(default_factory=dict)
    directory: Path | None = None


def prepare_data(
    tokenizer,
    corpus: CorpusSpec,
    seq_len: int,
    heldout_frac: float = 0.02,
    seed: int = 0,
    max_train_tokens: int | None = None,
) -> PackedData:
    """Tokenise, split (by document) and pack ``corpus`` into ``seq_len`` blocks, cached on disk.

    Args:
        tokenizer: the teacher tokenizer (a fast tokenizer is much quicker).
        corpus: a corpus spec (see :mod:`lrc_src.corpora`) or a mix mapping
            ``{"mix": {...weights}, "data_files": {...}, "shuffle_buffer": int}`` streamed by
            :func:`lrc_src.mix.paper_mix_documents`.
        seq_len: tokens per block (> 0).
        heldout_frac: fraction of documents held out, in [0, 1). A finite corpus holds out
            exactly ``max(1, round(frac * n_docs))`` documents chosen by a seeded permutation;
            a streamed mix holds out each document whose seeded hash falls under ``frac``.
        seed: seeds the held-out choice, the document order and the block shuffle.
        max_train_tokens: cap on training tokens (rounded down to whole blocks); tokenisation
            stops once reached. Required for a mix that streams from the hub.

    Raises:
        ValueError: bad ``seq_len``/``heldout_frac``/``max_train_tokens``, an empty corpus, too
            few documents to hold one out, or too little text for one training block.
    """
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(heldout_frac, (int, float)) or not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac!r}")
    if max_train_tokens is not None and (
        not isinstance(max_train_tokens, (int, np.integer)) or max_train_tokens < seq_len
    ):
        raise ValueError(
            f"max_train_tokens must be an integer >= seq_len ({seq_len}), got {max_train_tokens!r}"
        )
    seq_len, seed = int(seq_len), int(seed)

    if isinstance(corpus, Mapping):
        source_key, docs = mix_source_key(corpus, max_train_tokens), None
    else:
        parts = load_document_parts(corpus)
        docs = flatten_parts(parts)
        source_key = {"corpus": spec_parts(corpus), "documents_sha256": documents_sha256(docs)}
    tok_info = tokenizer_fingerprint(tokenizer)
    key_material = {
        "format": FORMAT_VERSION,
        **source_key,
        "tokenizer": tok_info["fingerprint"],
        "seq_len": seq_len,
        "heldout_frac": float(heldout_frac),
        "seed": seed,
        "max_train_tokens": None if max_train_tokens is None else int(max_train_tokens),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:20]
    final = cache_dir() / "tokens" / key
    if not (final / "meta.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
        try:
            if docs is not None:
                items, n_docs = split_documents(parts, heldout_frac, seed), len(docs)
            else:
                items, n_docs = _split_stream(open_mix(corpus, tokenizer, seed), heldout_frac, seed), None
            meta = _tokenise_and_pack(tokenizer, items, n_docs, seq_len, seed, max_train_tokens, tmp)
            meta.update(key=key, key_material=key_material, tokenizer=tok_info,
                        corpus=corpus if isinstance(corpus, (str, Mapping)) else list(corpus))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            tmp.chmod(0o755)
            rename_into_place(tmp, final, marker="meta.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_packed(final)


def _load_packed(folder: Path) -> PackedData:
    meta = json.loads((folder / "meta.json").read_text())
    return PackedData(
        train=np.load(folder / "train.npy", mmap_mode="r"),
        heldout=np.load(folder / "heldout.npy", mmap_mode="r"),
        heldout_path=folder / "heldout.jsonl",
        meta=meta,
        directory=folder,
    )


def split_documents(parts: list[tuple[str, list[dict]]], frac: float, seed: int) -> list[tuple[dict, bool]]:
    """(document, held out?) for every document of ``parts`` (see ``load_document_parts``), in a seeded
    permutation of them all. Each part holds out the first ``max(1, round(frac * n_part))`` of a
    seeded permutation of its own documents: what it holds out alone, whatever it is listed with."""
    docs, held = [], set()
    for part, part_docs in parts:
        n = len(part_docs)
        n_held = 0 if frac == 0 else max(1, int(round(frac * n)))
        if n_held >= n:
            raise ValueError(
                f"corpus {part!r} has {n} document(s): too few to hold out {n_held} and still train "
                f"(heldout_frac={frac})"
            )
        order = np.random.default_rng(seed).permutation(n)
        held.update(len(docs) + i for i in order[:n_held].tolist())
        docs.extend(part_docs)
    order = np.random.default_rng(seed).permutation(len(docs))
    return [(docs[i], i in held) for i in order]


def _split_stream(docs: Iterable[dict], frac: float, seed: int) -> Iterator[tuple[dict, bool]]:
    """Hold out each streamed document whose seeded sha256 falls below ``frac``."""
    threshold = int(frac * 2**64)
    for d in docs:
        h = hashlib.sha256(f"{seed}\x00{d['text']}".encode("utf-8")).digest()
        yield d, int.from_bytes(h[:8], "little") < threshold


def tokenizer_fingerprint(tokenizer) -> dict:
    """Name, size, special ids and a content hash (vocab + a probe encoding) of a tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    probe = "Hello world! 123 déjà vu\n\tdef f(x): return x**2  # ünïcode ☃"
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(tokenizer(probe, add_special_tokens=True)["input_ids"]).encode())
    h.update(f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}".encode())
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "fingerprint": h.hexdigest()[:20],
    }


def document_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids put before/after every document: BOS if the tokenizer adds one, then EOS."""
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "?")
        raise ValueError(f"tokenizer {name!r} has no EOS token to join documents")
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and with_special and with_special[0] == bos else []
    return prefix, [tokenizer.eos_token_id]


class _TokenFile:
    """Append-only flat uint32 token file."""

    def __init__(self, path: Path):
        self.path, self.tokens = path, 0
        self._f = open(path, "wb")

    def write(self, ids: np.ndarray) -> None:
        self._f.write(ids.astype(np.uint32, copy=False).tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        self._f.close()

    def blocks(self, seq_len: int, limit: int | None = None) -> np.ndarray:
        n = self.tokens // seq_len if limit is None else min(limit, self.tokens // seq_len)
        if n == 0:
            return np.zeros((0, seq_len), dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(n, seq_len))


def _tokenise_and_pack(
    tokenizer,
    items: Iterable[tuple[dict, bool]],
    n_docs: int | None,
    seq_len: int,
    seed: int,
    max_train_tokens: int | None,
    out: Path,
    batch_chars: int = 1_000_000,
) -> dict:
    """Tokenise ``(document, is_heldout)`` pairs in batches and write train/held-out arrays to ``out``."""
    if not getattr(tokenizer, "is_fast", False):
        import warnings

        warnings.warn("slow (non-fast) tokenizer: tokenisation will be slow", stacklevel=3)
    prefix, suffix = document_affixes(tokenizer)
    max_blocks = None if max_train_tokens is None else int(max_train_tokens) // seq_len
    train_file, held_file = _TokenFile(out / "train.raw"), _TokenFile(out / "heldout.raw")
    held_docs: list[dict] = []
    counts = {"train_documents": 0, "heldout_documents": 0}
    docs_hash = hashlib.sha256()
    t0 = time.perf_counter()
    bar = tqdm(total=n_docs, unit="doc", desc="tokenising", mininterval=1.0)

    def flush(batch: list[tuple[dict, bool]]) -> None:
        ids = tokenizer([d["text"] for d, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (doc, is_held), doc_ids in zip(batch, ids):
            arr = np.asarray(prefix + doc_ids + suffix, dtype=np.uint32)
            (held_file if is_held else train_file).write(arr)
            counts["heldout_documents" if is_held else "train_documents"] += 1
            if is_held:
                held_docs.append({"text": doc["text"], "source": doc.get("source", "")})
        bar.update(len(batch))

    batch, chars = [], 0
    for doc, is_held in items:
        if max_blocks is not None and train_file.tokens >= max_blocks * seq_len:
            break
        docs_hash.update(doc["text"].encode("utf-8") + b"\x1e")
        batch.append((doc, is_held))
        chars += len(doc["text"])
        if chars >= batch_chars:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)
    bar.close()
    train_file.close()
    held_file.close()
    seconds = time.perf_counter() - t0

    flat = train_file.blocks(seq_len, max_blocks)
    if len(flat) == 0:
        raise ValueError(
            f"only {train_file.tokens} training tokens after the held-out split: fewer than one "
            f"block of seq_len={seq_len}"
        )
    order = np.random.default_rng([seed, 1]).permutation(len(flat))
    train = np.lib.format.open_memmap(out / "train.npy", mode="w+", dtype=np.uint32, shape=flat.shape)
    for start in range(0, len(order), 4096):  # chunked gather: bounded memory for big corpora
        train[start:start + 4096] = flat[order[start:start + 4096]]
    train.flush()
    n_train_blocks = len(flat)
    del train, flat
    np.save(out / "heldout.npy", np.array(held_file.blocks(seq_len), dtype=np.uint32))
    write_jsonl(out / "heldout.jsonl", held_docs)
    os.remove(train_file.path)
    os.remove(held_file.path)
    return {
        **counts,
        "documents_seen_sha256": docs_hash.hexdigest(),
        "seq_len": seq_len,
        "document_prefix_ids": prefix,
        "document_suffix_ids": suffix,
        "train_tokens_tokenised": train_file.tokens,
        "train_blocks": n_train_blocks,
        "train_tokens": n_train_blocks * seq_len,
        "heldout_tokens_tokenised": held_file.tokens,
        "heldout_blocks": held_file.tokens // seq_len,
        "tokenise_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
