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

The stream is cut into chunks of ``CHUNK_CHARS`` characters, which worker processes tokenise (their
number is ``num_proc``) into shards under ``tokens/<key>.partial/``, each written atomically with
a record of its counts. A preparation that is killed keeps its finished shards, and a restart
tokenises only the rest. The packed folder is assembled from the shards in stream order, so the
bytes do not depend on the number of workers, and is renamed into place; then the shards go.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lrc_src.corpora import (
    documents_sha256,
    flatten_parts,
    load_document_parts,
    spec_parts,
)
from lrc_src.fileio import atomic_write_bytes, atomic_write_text, locked, rename_into_place, write_jsonl
from lrc_src.mix import mix_source_key, open_mix
from lrc_src.teachers import cache_dir

CorpusSpec = str | Sequence[str] | Mapping[str, Any]

# Part of every cache key: bump it whenever the bytes of a packed block or the split could change.
FORMAT_VERSION = 2
# Documents are tokenised in chunks of at least this many characters, one shard each. A capped
# stream stops after the chunk that reaches max_train_tokens, so this decides which held-out
# documents a capped mix keeps: part of the format (bump FORMAT_VERSION if it changes).
CHUNK_CHARS = 1_000_000
# Default number of tokenising workers: the CPUs this process may use, at most this many (one
# process reads the stream and feeds them all); LRC_TOKENISE_PROCS or num_proc set it.
MAX_DEFAULT_PROCS = 8


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
    num_proc: int | None = None,
    progress: bool = True,
) -> PackedData:
    """Tokenise, split (by document) and pack ``corpus`` into ``seq_len`` blocks, cached on disk.

    Args:
        tokenizer: the teacher tokenizer (a fast tokenizer is much quicker).
        corpus: a corpus spec (see :mod:`lrc_src.corpora`) or a mix mapping
            ``{"mix": {...weights}, "data_files": {...}, "shuffle_buffer": int}`` streamed by
            :func:`lrc_src.mix.paper_mix_documents`.
        seq_len: tokens per block (> 0).
        heldout_frac: fraction of documents held out, in [0, 1). A finite corpus holds out
            ``max(1, round(frac * n_docs))`` documents of each part chosen by a seeded permutation
            (under ``max_train_tokens``, those the stream reached before the cap; ``meta`` counts
            them); a streamed mix holds out each document whose seeded hash falls under ``frac``.
        seed: seeds the held-out choice, the document order and the block shuffle.
        max_train_tokens: cap on training tokens (rounded down to whole blocks); tokenisation
            stops once reached. Required for a mix that streams from the hub.
        num_proc: worker processes that tokenise (1: in this process). None: the environment
            variable ``LRC_TOKENISE_PROCS``, else the CPUs this process may use (at most
            ``MAX_DEFAULT_PROCS``). Does not change the result, nor the cache key.
        progress: show a progress bar while tokenising.

    Raises:
        ValueError: bad ``seq_len``/``heldout_frac``/``max_train_tokens``/``num_proc``, an empty
            corpus, too few documents to hold one out, or too little text for one training block.
    """
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(heldout_frac, (int, float)) or not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac!r}")
    if max_train_tokens is not None and (
        not isinstance(max_train_tokens, (int, np.integer)) or max_train_tokens < seq_len
    ):
        raise ValueError(f"max_train_tokens must be an integer >= seq_len ({seq_len}), got {max_train_tokens!r}")
    seq_len, seed = int(seq_len), int(seed)
    num_proc = tokenise_procs(num_proc)

    if isinstance(corpus, Mapping):
        source_key, docs = mix_source_key(corpus, max_train_tokens, tokenizer), None
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
    if (final / "meta.json").is_file():
        return _load_packed(final)
    # Shards of an unfinished preparation: kept when it is killed, reused when it is restarted,
    # removed once the packed folder is in place. One preparation of a key at a time uses them.
    shards = final.parent / f"{key}.partial"
    with locked(shards / ".lock"):
        if not (final / "meta.json").is_file():
            for stale in final.parent.glob(f".{key}.tmp-*"):  # left by a killed run (it held the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
            try:
                if docs is not None:
                    items = split_documents(parts, heldout_frac, seed)
                    n_docs = len(items)
                else:
                    items, n_docs = _split_stream(open_mix(corpus, tokenizer, seed), heldout_frac, seed), None
                meta = _tokenise_and_pack(
                    tokenizer, items, n_docs, seq_len, seed, max_train_tokens, tmp, shards, num_proc, progress=progress
                )
                meta.update(
                    key=key,
                    key_material=key_material,
                    tokenizer=tok_info,
                    corpus=corpus if isinstance(corpus, (str, Mapping)) else list(corpus),
                )
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
                tmp.chmod(0o755)
                rename_into_place(tmp, final, marker="meta.json")
            except ValueError:  # bad input: a rerun would fail alike, so keep no shards
                shutil.rmtree(shards, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    return _load_packed(final)


def tokenise_procs(num_proc: int | None = None) -> int:
    """The number of tokenising processes: ``num_proc``, else ``$LRC_TOKENISE_PROCS``, else the
    CPUs this process may use, at most ``MAX_DEFAULT_PROCS``."""
    if num_proc is None and os.environ.get("LRC_TOKENISE_PROCS", "").strip():
        raw = os.environ["LRC_TOKENISE_PROCS"].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"LRC_TOKENISE_PROCS={raw!r} must be a positive integer")
        return int(raw)
    if num_proc is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(cpus, MAX_DEFAULT_PROCS))
    if not isinstance(num_proc, (int, np.integer)) or isinstance(num_proc, bool) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive integer or None, got {num_proc!r}")
    return int(num_proc)


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
    seeded permutation of its own documents: what it holds out alone, whatever it is listed with.
    A training document with the text of a held-out one is left out, so held-out text never trains."""
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
    held_texts = {docs[i]["text"] for i in held}  # a copy of a held-out document does not train
    order = np.random.default_rng(seed).permutation(len(docs))
    return [(docs[i], i in held) for i in order if i in held or docs[i]["text"] not in held_texts]


def _split_stream(docs: Iterable[dict], frac: float, seed: int) -> Iterator[tuple[dict, bool]]:
    """Hold out each streamed document whose seeded sha256 falls below ``frac``."""
    threshold = int(frac * 2**64)
    for d in docs:
        h = hashlib.sha256(f"{seed}\x00{d['text']}".encode()).digest()
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


# ============================================================================================
# Tokenisation in chunks, one shard each, by worker processes
# ============================================================================================


@dataclass
class _Chunk:
    """Consecutive ``(document, is_heldout)`` pairs of the stream, tokenised as one shard."""

    index: int
    docs: list[dict]
    held: list[bool]
    text_bytes: bytes  # every text + b"\x1e": what meta's documents_seen_sha256 hashes
    sha256: str  # of text_bytes and the held-out flags: a shard is reused only for the same chunk


def _chunks(items: Iterable[tuple[dict, bool]], chunk_chars: int) -> Iterator[_Chunk]:
    """Cut the stream into chunks of at least ``chunk_chars`` characters (the last may be shorter)."""
    docs, held, parts, chars, index = [], [], [], 0, 0
    for doc, is_held in items:
        docs.append(doc)
        held.append(bool(is_held))
        parts.append(doc["text"].encode("utf-8") + b"\x1e")
        chars += len(doc["text"])
        if chars >= chunk_chars:
            yield _make_chunk(index, docs, held, parts)
            docs, held, parts, chars, index = [], [], [], 0, index + 1
    if docs:
        yield _make_chunk(index, docs, held, parts)


def _make_chunk(index: int, docs: list[dict], held: list[bool], parts: list[bytes]) -> _Chunk:
    text_bytes = b"".join(parts)
    sha = hashlib.sha256(text_bytes + bytes(held)).hexdigest()
    return _Chunk(index, docs, held, text_bytes, sha)


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard_{index:06d}.npy"


def _finished_shard(folder: Path, chunk: _Chunk) -> dict | None:
    """The record of ``chunk``'s shard if an earlier (interrupted) preparation finished it."""
    npy = _shard_path(folder, chunk.index)
    record_path = npy.with_suffix(".json")
    if not (record_path.is_file() and npy.is_file()):
        return None
    record = json.loads(record_path.read_text())
    return record if record.get("documents_sha256") == chunk.sha256 else None


def _tokenise_chunk(
    tokenizer, prefix: list[int], suffix: list[int], texts: list[str], held: list[bool], shard: Path, sha256: str
) -> dict:
    """Tokenise one chunk and write its shard: the training documents' tokens, then the held-out
    documents' (each as prefix + ids + suffix, in stream order), and a record of the counts,
    written last so that it marks a finished shard."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    train: list[int] = []
    heldout: list[int] = []
    for is_held, doc_ids in zip(held, ids):
        out = heldout if is_held else train
        out += prefix
        out += doc_ids
        out += suffix
    buffer = io.BytesIO()
    np.save(buffer, np.array(train + heldout, dtype=np.uint32))
    atomic_write_bytes(shard, buffer.getvalue())
    record = {
        "documents_sha256": sha256,
        "documents": len(texts),
        "train_tokens": len(train),
        "heldout_tokens": len(heldout),
    }
    atomic_write_text(shard.with_suffix(".json"), json.dumps(record) + "\n")
    return record


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    # each worker tokenises one chunk on one core: the tokenizer's own thread pool would
    # oversubscribe the CPUs the other workers use
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_tokenise_chunk(*args) -> dict:
    return _tokenise_chunk(_WORKER_TOKENIZER, *args)


def _pool_context():
    # fork on Linux: workers start at once with the parent's tokenizer and modules, without
    # re-importing torch/transformers or unpickling the tokenizer in each (as datasets.map does);
    # elsewhere the platform's default (spawn on macOS, where fork is unsafe)
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


def _tokenised_chunks(
    tokenizer, chunks: Iterator[_Chunk], folder: Path, num_proc: int, prefix: list[int], suffix: list[int]
) -> Iterator[tuple[_Chunk, dict]]:
    """``(chunk, shard record)`` in stream order. A shard finished by an earlier run is reused;
    the others are tokenised in this process (``num_proc == 1``) or by ``num_proc`` workers, at
    most ``num_proc + 1`` chunks ahead of the consumer (a capped stream wastes little past its
    cap). Closing the generator cancels the chunks not started and waits for the others."""

    def args(chunk: _Chunk) -> tuple:
        texts = [d["text"] for d in chunk.docs]
        return prefix, suffix, texts, chunk.held, _shard_path(folder, chunk.index), chunk.sha256

    if num_proc == 1:
        for chunk in chunks:
            yield chunk, _finished_shard(folder, chunk) or _tokenise_chunk(tokenizer, *args(chunk))
        return
    pool, pending = None, collections.deque()
    try:
        for chunk in chunks:
            record = _finished_shard(folder, chunk)
            if record is None:
                if pool is None:
                    pool = ProcessPoolExecutor(
                        num_proc, mp_context=_pool_context(), initializer=_init_worker, initargs=(tokenizer,)
                    )
                future = pool.submit(_worker_tokenise_chunk, *args(chunk))
            else:
                future = Future()
                future.set_result(record)
            pending.append((chunk, future))
            while pending and (len(pending) > num_proc + 1 or pending[0][1].done()):
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _tokenise_and_pack(
    tokenizer,
    items: Iterable[tuple[dict, bool]],
    n_docs: int | None,
    seq_len: int,
    seed: int,
    max_train_tokens: int | None,
    out: Path,
    shards: Path,
    num_proc: int = 1,
    chunk_chars: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise ``(document, is_heldout)`` pairs into shards in ``shards`` (reusing those an
    interrupted run finished), then write the train/held-out arrays to ``out``."""
    if not getattr(tokenizer, "is_fast", False):
        import warnings

        warnings.warn("slow (non-fast) tokenizer: tokenisation will be slow", stacklevel=3)
    prefix, suffix = document_affixes(tokenizer)
    max_blocks = None if max_train_tokens is None else int(max_train_tokens) // seq_len
    records: list[tuple[int, dict]] = []
    held_docs: list[dict] = []
    counts = {"train_documents": 0, "heldout_documents": 0}
    docs_hash = hashlib.sha256()
    train_tokens = held_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=n_docs,
        unit="doc",
        desc=f"tokenising ({num_proc} process{'es' * (num_proc > 1)})",
        mininterval=1.0,
        disable=not progress,
    )
    chunks = _chunks(items, CHUNK_CHARS if chunk_chars is None else chunk_chars)
    with contextlib.closing(_tokenised_chunks(tokenizer, chunks, shards, num_proc, prefix, suffix)) as done:
        for chunk, record in done:
            records.append((chunk.index, record))
            docs_hash.update(chunk.text_bytes)
            counts["heldout_documents"] += sum(chunk.held)
            counts["train_documents"] += len(chunk.held) - sum(chunk.held)
            held_docs += [
                {"text": d["text"], "source": d.get("source", "")}
                for d, is_held in zip(chunk.docs, chunk.held)
                if is_held
            ]
            train_tokens += record["train_tokens"]
            held_tokens += record["heldout_tokens"]
            bar.update(len(chunk.docs))
            if max_blocks is not None and train_tokens >= max_blocks * seq_len:
                break
    bar.close()
    seconds = time.perf_counter() - t0

    n_train_blocks = train_tokens // seq_len if max_blocks is None else min(max_blocks, train_tokens // seq_len)
    if n_train_blocks == 0:
        raise ValueError(
            f"only {train_tokens} training tokens after the held-out split: fewer than one block of seq_len={seq_len}"
        )
    heldout = _pack_shards(shards, records, seq_len, seed, n_train_blocks, out / "train.npy")
    np.save(out / "heldout.npy", heldout)
    write_jsonl(out / "heldout.jsonl", held_docs)
    return {
        **counts,
        "documents_seen_sha256": docs_hash.hexdigest(),
        "seq_len": seq_len,
        "document_prefix_ids": prefix,
        "document_suffix_ids": suffix,
        "train_tokens_tokenised": train_tokens,
        "train_blocks": n_train_blocks,
        "train_tokens": n_train_blocks * seq_len,
        "heldout_tokens_tokenised": held_tokens,
        "heldout_blocks": held_tokens // seq_len,
        "tokenise_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pack_shards(
    folder: Path, records: list[tuple[int, dict]], seq_len: int, seed: int, n_blocks: int, train_path: Path
) -> np.ndarray:
    """Cut the shards' training tokens, concatenated in stream order, into ``n_blocks`` blocks
    and write them shuffled by seed to ``train_path``; return the held-out blocks (tails dropped).

    Block ``order[j]`` of the stream is row ``j`` of the file, so each shard's blocks are written
    to their rows as the shards are read in order, without a copy of the whole stream."""
    order = np.random.default_rng([seed, 1]).permutation(n_blocks)
    row_of = np.empty_like(order)
    row_of[order] = np.arange(n_blocks)
    train = np.lib.format.open_memmap(train_path, mode="w+", dtype=np.uint32, shape=(n_blocks, seq_len))
    carry, done, held_parts = np.zeros(0, dtype=np.uint32), 0, []
    for index, record in records:
        shard = _shard_path(folder, index)
        tokens = np.load(shard, mmap_mode="r")
        n_train = record["train_tokens"]
        if len(tokens) != n_train + record["heldout_tokens"]:
            raise ValueError(
                f"{shard} holds {len(tokens)} tokens but its record {shard.with_suffix('.json')} counts "
                f"{n_train} + {record['heldout_tokens']}: a damaged shard (the unfinished preparation's "
                "shards are removed; run again to tokenise anew)"
            )
        held_parts.append(np.array(tokens[n_train:]))
        if done < n_blocks:
            stream = np.concatenate([carry, tokens[:n_train]])
            n = min(len(stream) // seq_len, n_blocks - done)
            train[row_of[done : done + n]] = stream[: n * seq_len].reshape(n, seq_len)
            carry, done = stream[n * seq_len :], done + n
        del tokens
    assert done == n_blocks
    train.flush()
    del train
    held = np.concatenate(held_parts) if held_parts else np.zeros(0, dtype=np.uint32)
    n_held = len(held) // seq_len
    return held[: n_held * seq_len].reshape(n_held, seq_len)
