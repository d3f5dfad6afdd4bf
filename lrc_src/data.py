"""Training text: corpora, the paper's streaming mixes, tokenisation, packing and held-out split.

Corpus specs
------------
A corpus spec is a string or a list of strings (a list is a mixture: the documents of each part,
concatenated in order):

``python-docs``
    The Python 3.11 documentation (PSF licence) from the Debian package ``python3.11-doc``:
    ``/usr/share/info/python3.11.info.gz`` split into info nodes (one document per node; the
    ``Top`` menu, the two index nodes and nodes under 200 characters are dropped; Info
    cross-reference markup ``*note name: anchor.`` is reduced to ``name``).
``kjv``
    The King James Bible (public domain) from the Debian packages ``bible-kjv-text`` and
    ``bible-kjv``: the unpacked ``bible`` program prints every verse; one document per chapter.
``local:<glob>``
    Local text files. Several files: one document per file. Exactly one file: one document per
    blank-line-separated block (a single file is usually one long text). ``*.jsonl`` files hold
    one document per line in a ``"text"`` field (e.g. a held-out file written by this module).

The Debian corpora are fetched by the project itself, without root: ``apt-get download`` into
``cache_dir()/corpora/<name>/debs``, ``dpkg-deb -x``, parse, then ``documents.jsonl``
(``{"text", "source"}`` per line) and ``manifest.json`` (sha256 of every ``.deb``) are written
next to each other. The folder is built under a temporary name and renamed, and reused if present.

The paper profile's data (Fineweb-Edu int_score>=4, DCLM, Cosmopedia-v2, OpenHermes-2.5) is
streamed from the Hugging Face hub by :func:`paper_mix_documents`; pass a mapping
``{"mix": {"fineweb_edu": 18, ...}, "data_files": {...}}`` to :func:`prepare_data` to use it.

Packing
-------
:func:`prepare_data` tokenises every document with the teacher tokenizer (no special tokens,
then BOS in front only if the tokenizer adds one by default, e.g. Llama-3, and EOS after each
document), concatenates and cuts the stream into ``seq_len`` blocks (the tail is dropped; no
cross-document attention mask, as in the paper). The held-out split is by DOCUMENT, decided
before tokenisation, so held-out text is never in a training block; a list spec holds out, of
each of its parts, the documents that part holds out alone, so a run on ``[a, b]`` never trains on
``a``'s held-out documents (Table 4 scores runs on each corpus's held-out set). Training blocks are
shuffled by seed. Results are cached as uint32 ``.npy`` files (opened as memmaps) under
``cache_dir()/tokens/<key>/``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from lrc_src.teachers import cache_dir, hub_offline_reason

CorpusSpec = Union[str, Sequence[str], Mapping[str, Any]]

FORMAT_VERSION = 2  # 2: a list spec's held-out split is per part (single-part specs: as in 1)
MIN_INFO_NODE_CHARS = 200
PYTHON_DOCS_PACKAGES = ("python3.11-doc",)
PYTHON_DOCS_INFO = "usr/share/info/python3.11.info.gz"
KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")
KJV_RANGE = "Genesis 1:1-Revelation 22:21"
BUILTIN_CORPORA = ("python-docs", "kjv")
_INFO_SKIP_NODES = {"Top", "Index", "Python Module Index"}
_INFO_IMAGE = re.compile(r"\x00\x08\[[^\x00]*\x00\x08\]")
# Info cross references: "*note Foo::" and "*note sys.path: f9." (hex anchor) -> "Foo", "sys.path"
_INFO_NOTE_SELF = re.compile(r"\*[Nn]ote\s+([^:*]+?)::")
_INFO_NOTE_REF = re.compile(r"\*[Nn]ote\s+([^:*]+?):\s*[^\s.,:]+[.,]")
_KJV_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# ============================================================================================
# Built-in Debian corpora
# ============================================================================================


def corpus_folder(name: str) -> Path:
    """Folder of built-in corpus ``name`` (``documents.jsonl`` + ``manifest.json``), built once."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; known: {', '.join(BUILTIN_CORPORA)}")
    final = cache_dir() / "corpora" / name
    if (final / "manifest.json").is_file() and (final / "documents.jsonl").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        packages = PYTHON_DOCS_PACKAGES if name == "python-docs" else KJV_PACKAGES
        debs = _apt_download(packages, tmp / "debs")
        unpacked = tmp / "unpacked"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        docs = _python_docs_documents(unpacked) if name == "python-docs" else _kjv_documents(unpacked)
        shutil.rmtree(unpacked)
        _write_jsonl(tmp / "documents.jsonl", docs)
        manifest = {
            "corpus": name,
            "packages": [_deb_record(deb) for deb in debs],
            "documents": len(docs),
            "characters": sum(len(d["text"]) for d in docs),
            "documents_sha256": documents_sha256(docs),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        _rename_into_place(tmp, final, marker="manifest.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _apt_download(packages: Sequence[str], dest: Path) -> list[Path]:
    """``apt-get download`` each package into ``dest`` (needs no root) and return the .deb paths."""
    dest.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"{tool!r} not found: the built-in corpora come from Debian packages "
                f"({', '.join(packages)}); use a Debian/Ubuntu machine or a 'local:<glob>' corpus"
            )
    for package in packages:
        proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"'apt-get download {package}' failed (exit {proc.returncode}); is the package list "
                f"current (apt-get update)? stderr:\n{proc.stderr.strip()[-2000:]}"
            )
    debs = []
    for package in packages:
        found = sorted(dest.glob(f"{package}_*.deb"))
        if not found:
            raise RuntimeError(f"'apt-get download {package}' produced no {package}_*.deb in {dest}")
        debs.append(found[-1])
    return debs


def _deb_record(deb: Path) -> dict:
    def field_(name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
        ).stdout.strip()

    return {
        "package": field_("Package"),
        "version": field_("Version"),
        "architecture": field_("Architecture"),
        "file": deb.name,
        "bytes": deb.stat().st_size,
        "sha256": _file_sha256(deb),
    }


def _python_docs_documents(root: Path) -> list[dict]:
    """Split the Texinfo manual into nodes (``\\x1f`` separates them); one document per node."""
    info = root / PYTHON_DOCS_INFO
    with gzip.open(info, "rt", encoding="utf-8") as f:
        raw = f.read()
    docs = []
    for chunk in raw.split("\x1f"):
        if not chunk.startswith("\nFile:"):  # preamble, tag table, local-variables trailer
            continue
        header, _, body = chunk.lstrip("\n").partition("\n")
        node = re.search(r"Node: (.*?)(?:,  (?:Next|Prev|Up):|$)", header)
        node_name = node.group(1) if node else "?"
        if node_name in _INFO_SKIP_NODES:
            continue
        text = _INFO_NOTE_REF.sub(r"\1", _INFO_NOTE_SELF.sub(r"\1", _INFO_IMAGE.sub("", body))).strip()
        if len(text) >= MIN_INFO_NODE_CHARS:
            docs.append({"text": text, "source": f"python-docs:{node_name}"})
    return docs


def _kjv_documents(root: Path) -> list[dict]:
    """Run the unpacked ``bible`` program over the whole Bible; one document per chapter."""
    bible = root / "usr" / "bin" / "bible"
    proc = subprocess.run(
        [str(bible), "-f", "-p", str(root / "usr" / "lib"), KJV_RANGE],
        capture_output=True,
        check=True,
    )
    chapters: dict[str, list[str]] = defaultdict(list)  # insertion-ordered: canonical book order
    for line in proc.stdout.decode("utf-8", errors="replace").splitlines():
        m = _KJV_VERSE.match(line.strip())
        if m:
            book, chapter, _verse, text = m.groups()
            chapters[f"{book}{chapter}"].append(text.strip())
    return [{"text": "\n".join(verses), "source": f"kjv:{ref}"} for ref, verses in chapters.items()]


# ============================================================================================
# Documents
# ============================================================================================


def load_documents(corpus: str | Sequence[str]) -> list[dict]:
    """Documents (``{"text", "source"}``) of a corpus spec; a list spec concatenates its parts.

    Raises:
        ValueError: unknown corpus name, malformed spec, or a corpus with no documents.
        FileNotFoundError: a ``local:`` glob that matches no file.
    """
    return _flatten(load_document_parts(corpus))


def _flatten(parts: list[tuple[str, list[dict]]]) -> list[dict]:
    """The documents of `load_document_parts` output, parts concatenated in order."""
    return [d for _, docs in parts for d in docs]


def load_document_parts(corpus: str | Sequence[str]) -> list[tuple[str, list[dict]]]:
    """(part, its documents) for each part of a corpus spec, in spec order (see load_documents)."""
    if isinstance(corpus, Mapping):
        raise ValueError(
            "a mix spec (mapping) is streamed, not loaded as a list: use paper_mix_documents() "
            "or prepare_data()"
        )
    parts: list[tuple[str, list[dict]]] = []
    for part in _spec_parts(corpus):
        if part in BUILTIN_CORPORA:
            part_docs = _read_jsonl(corpus_folder(part) / "documents.jsonl")
        elif part.startswith("local:"):
            part_docs = _local_documents(part)
        else:
            raise ValueError(
                f"unknown corpus {part!r}; use one of {', '.join(BUILTIN_CORPORA)} or 'local:<glob>'"
            )
        if not part_docs:
            raise ValueError(f"corpus {part!r} has no documents")
        parts.append((part, part_docs))
    return parts


def _spec_parts(corpus: str | Sequence[str]) -> list[str]:
    parts = [corpus] if isinstance(corpus, str) else list(corpus) if isinstance(corpus, Sequence) else None
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(f"corpus spec must be a non-empty string or list of strings, got {corpus!r}")
    return [p.strip() for p in parts]


def _local_documents(spec: str) -> list[dict]:
    pattern = os.path.expanduser(spec[len("local:"):])
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"corpus {spec!r}: no file matches {pattern!r}")
    docs: list[dict] = []
    for path in files:
        if path.endswith(".jsonl"):
            docs.extend(
                {"text": d["text"], "source": d.get("source", f"{path}:{i}")}
                for i, d in enumerate(_read_jsonl(Path(path)))
                if d.get("text", "").strip()
            )
            continue
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if len(files) == 1:
            blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
            docs.extend({"text": b, "source": f"{path}:{i}"} for i, b in enumerate(blocks) if b)
        elif text.strip():
            docs.append({"text": text.strip(), "source": path})
    return docs


def documents_sha256(docs: Iterable[dict]) -> str:
    """sha256 over the document texts (order matters)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d["text"].encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


# ============================================================================================
# Paper profile: streaming hub mixes
# ============================================================================================


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


def paper_mix_documents(
    mix: Mapping[str, float],
    tokenizer=None,
    seed: int = 0,
    data_files: Mapping[str, str | os.PathLike] | None = None,
    shuffle_buffer: int = 10_000,
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
    seeded by ``seed``); the stream ends when any source is exhausted (no repetition).
    Every source is opened before this returns, so an offline hub fails at once with a
    ``FileNotFoundError`` naming the dataset.
    """
    data_files = dict(data_files or {})
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"mix must be a non-empty mapping source -> weight, got {mix!r}")
    unknown = sorted(set(mix) - set(PAPER_SOURCES)) + sorted(set(data_files) - set(PAPER_SOURCES))
    if unknown:
        raise ValueError(f"unknown mix source(s) {unknown}; known: {', '.join(PAPER_SOURCES)}")
    weights = {}
    for name, w in mix.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mix weight of {name!r} must be a finite number >= 0, got {w!r}")
        if w > 0:
            weights[name] = float(w)
    if not weights:
        raise ValueError(f"mix {dict(mix)!r} has no positive weight")
    if "openhermes" in weights and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "mix source 'openhermes' needs a tokenizer with a chat template to render conversations"
        )

    names = list(weights)
    streams = [
        _source_records(name, data_files.get(name), tokenizer, seed, shuffle_buffer) for name in names
    ]
    p = np.array([weights[n] for n in names]) / sum(weights.values())
    return _interleave(names, streams, p, seed)


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
        reason = hub_offline_reason()
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
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _records_to_documents(name: str, src: HubSource, records: Iterable[dict], tokenizer) -> Iterator[dict]:
    for rec in records:
        if src.min_int_score is not None:
            score = rec.get("int_score", (rec.get("metadata") or {}).get("int_score"))
            if score is None:
                raise ValueError(f"mix source {name!r} ({src.label}): record has no int_score to filter on")
            if int(score) < src.min_int_score:
                continue
        text = render_conversation(rec["conversations"], tokenizer) if src.kind == "chat" else rec["text"]
        if text and text.strip():
            yield {"text": text, "source": name}


def render_conversation(conversation: Sequence[Mapping[str, str]], tokenizer) -> str:
    """Render one OpenHermes conversation (``from``/``value`` turns) with the chat template."""
    messages = []
    for turn in conversation:
        role = OPENHERMES_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(
                f"OpenHermes turn has unknown role {turn['from']!r}; known: {sorted(OPENHERMES_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return tokenizer.apply_chat_template(messages, tokenize=False)


# ============================================================================================
# Tokenisation, packing, held-out split, cache
# ============================================================================================


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
        corpus: a corpus spec (see module docstring) or a mix mapping
            ``{"mix": {...weights}, "data_files": {...}, "shuffle_buffer": int}`` streamed by
            :func:`paper_mix_documents`.
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
        source_key, docs = _mix_source_key(corpus, max_train_tokens), None
    else:
        parts = load_document_parts(corpus)
        docs = _flatten(parts)
        source_key = {"corpus": _spec_parts(corpus), "documents_sha256": documents_sha256(docs)}
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
                items, n_docs = _split_finite(parts, heldout_frac, seed), len(docs)
            else:
                items, n_docs = _split_stream(_open_mix(corpus, tokenizer, seed), heldout_frac, seed), None
            meta = _tokenise_and_pack(tokenizer, items, n_docs, seq_len, seed, max_train_tokens, tmp)
            meta.update(key=key, key_material=key_material, tokenizer=tok_info,
                        corpus=corpus if isinstance(corpus, (str, Mapping)) else list(corpus))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
            tmp.chmod(0o755)
            _rename_into_place(tmp, final, marker="meta.json")
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


def _mix_source_key(corpus: Mapping[str, Any], max_train_tokens: int | None) -> dict:
    extra = set(corpus) - {"mix", "data_files", "shuffle_buffer"}
    if "mix" not in corpus or extra:
        raise ValueError(
            "a mix corpus needs a 'mix' key and may have 'data_files', 'shuffle_buffer'; "
            f"got keys {sorted(corpus)}"
        )
    mix = {k: float(v) for k, v in dict(corpus["mix"]).items()}
    files = dict(corpus.get("data_files") or {})
    from_hub = [n for n, w in mix.items() if w > 0 and n not in files]
    if from_hub and max_train_tokens is None:
        raise ValueError(f"a mix streaming {from_hub} from the hub is unbounded: set max_train_tokens")
    sources = {}
    for name in sorted(mix):
        if name in files:
            path = Path(files[name]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data_files for mix source {name!r}: {str(path)!r} does not exist")
            sources[name] = {"data_files": str(path.resolve()), "sha256": _file_sha256(path)}
        elif name in PAPER_SOURCES:
            sources[name] = {"hub": PAPER_SOURCES[name].label}
    return {"mix": mix, "sources": sources, "shuffle_buffer": int(corpus.get("shuffle_buffer", 10_000))}


def _open_mix(corpus: Mapping[str, Any], tokenizer, seed: int) -> Iterator[dict]:
    return paper_mix_documents(
        corpus["mix"], tokenizer, seed=seed, data_files=corpus.get("data_files"),
        shuffle_buffer=int(corpus.get("shuffle_buffer", 10_000)),
    )


def _split_finite(parts: list[tuple[str, list[dict]]], frac: float, seed: int) -> list[tuple[dict, bool]]:
    """(document, held out?) for every document of ``parts`` (see load_document_parts), in a seeded
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
    _write_jsonl(out / "heldout.jsonl", held_docs)
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


# ============================================================================================
# Small file helpers (private to this module)
# ============================================================================================


def _rename_into_place(tmp: Path, final: Path, marker: str) -> None:
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: keep its copy
        if not (final / marker).is_file():
            raise


def _write_jsonl(path: Path, docs: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
