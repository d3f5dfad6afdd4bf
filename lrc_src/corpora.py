"""Training corpora as documents: the Debian-packaged texts and local files.

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
    one document per line in a ``"text"`` field (e.g. a held-out file written by
    :mod:`lrc_src.packing`).

A document is ``{"text", "source"}``. The Debian corpora are fetched by the project itself,
without root: ``apt-get download`` into ``cache_dir()/corpora/<name>/debs``, ``dpkg-deb -x``,
parse, then ``documents.jsonl`` (one document per line) and ``manifest.json`` (sha256 of every
``.deb``) are written next to each other. The folder is built under a temporary name and renamed,
and reused if present.

The paper profile's streamed hub mix is in :mod:`lrc_src.mix`; tokenisation, the held-out split
and packing in :mod:`lrc_src.packing`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lrc_src.fileio import build_folder_once, has_text, read_jsonl, sha256_file, write_jsonl
from lrc_src.teachers import cache_dir

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
    return build_folder_once(cache_dir() / "corpora" / name, "manifest.json", lambda tmp: _build_corpus(name, tmp))


def _build_corpus(name: str, tmp: Path) -> None:
    """Download the corpus's Debian packages into ``tmp``, unpack them, and write its documents and
    manifest (last) there."""
    packages = PYTHON_DOCS_PACKAGES if name == "python-docs" else KJV_PACKAGES
    debs = _apt_download(packages, tmp / "debs")
    unpacked = tmp / "unpacked"
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    docs = _python_docs_documents(unpacked) if name == "python-docs" else _kjv_documents(unpacked)
    shutil.rmtree(unpacked)
    write_jsonl(tmp / "documents.jsonl", docs)
    manifest = {
        "corpus": name,
        "packages": [_deb_record(deb) for deb in debs],
        "documents": len(docs),
        "characters": sum(len(d["text"]) for d in docs),
        "documents_sha256": documents_sha256(docs),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


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
        "sha256": sha256_file(deb),
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
    return flatten_parts(load_document_parts(corpus))


def flatten_parts(parts: list[tuple[str, list[dict]]]) -> list[dict]:
    """The documents of `load_document_parts` output, parts concatenated in order."""
    return [d for _, docs in parts for d in docs]


def load_document_parts(corpus: str | Sequence[str]) -> list[tuple[str, list[dict]]]:
    """(part, its documents) for each part of a corpus spec, in spec order (see load_documents)."""
    if isinstance(corpus, Mapping):
        raise ValueError(
            "a mix spec (mapping) is streamed, not loaded as a list: use lrc_src.mix.paper_mix_documents() "
            "or lrc_src.packing.prepare_data()"
        )
    parts: list[tuple[str, list[dict]]] = []
    for part in spec_parts(corpus):
        if part in BUILTIN_CORPORA:
            part_docs = read_jsonl(corpus_folder(part) / "documents.jsonl")
        elif part.startswith("local:"):
            part_docs = _local_documents(part)
        else:
            raise ValueError(f"unknown corpus {part!r}; use one of {', '.join(BUILTIN_CORPORA)} or 'local:<glob>'")
        if not part_docs:
            raise ValueError(f"corpus {part!r} has no documents")
        parts.append((part, part_docs))
    return parts


def spec_parts(corpus: str | Sequence[str]) -> list[str]:
    """The parts of a corpus spec as stripped strings (a string is one part); ValueError if malformed."""
    parts = [corpus] if isinstance(corpus, str) else list(corpus) if isinstance(corpus, Sequence) else None
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError(f"corpus spec must be a non-empty string or list of strings, got {corpus!r}")
    return [p.strip() for p in parts]


def _local_documents(spec: str) -> list[dict]:
    pattern = os.path.expanduser(spec[len("local:") :])
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"corpus {spec!r}: no file matches {pattern!r}")
    docs: list[dict] = []
    for path in files:
        if path.endswith(".jsonl"):
            for i, d in enumerate(read_jsonl(Path(path), has_text, '{"text": "..."}')):
                if d["text"].strip():
                    docs.append({"text": d["text"], "source": d.get("source", f"{path}:{i}")})
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:  # a compressed or binary file, or another encoding: not text to train on
            raise ValueError(
                f"corpus {spec!r}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "convert it to UTF-8 or leave it out of the glob"
            ) from None
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
