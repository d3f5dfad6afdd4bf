"""Tokenisation throughput of `lrc_src.packing.prepare_data`: one process against worker processes.

Writes a local stand-in of the paper's training mix (Fineweb-Edu, DCLM and Cosmopedia-v2 records
and OpenHermes conversations, in the hub schemas, as .jsonl) of about --mb MB of text, then
prepares it with the real SmolLM2 tokenizer twice, each time into a fresh cache: with
num_proc=1 (tokenised in this process, the single-process path) and with num_proc=--procs
worker processes. Prints the tokens/s of each run (every token of the stream, training and
held out, over the wall time of the whole preparation: reading the stream, tokenising, packing),
their ratio, and the CPU seconds of this process and of the workers. Checks that both runs
packed the same bytes.

Both runs first fill the mix's shuffle buffers (10,000 records a source) before the first chunk
can be tokenised, about 1.2 s here in one process whatever the number of workers; the default size
is large enough that this fixed start does not decide the ratio, as it does not at the paper's
10B tokens.

    python benchmarks/tokenise.py                       # ~128 MB of text from the python-docs corpus
    python benchmarks/tokenise.py --text synthetic      # no corpus needed
    python benchmarks/tokenise.py --mb 8 --procs 4 --cpus 0-3

The single-process run tokenises as `prepare_data` always has, so TOKENIZERS_PARALLELISM (the
tokenizers library's own threads inside a batch) applies to it as it is set in the environment;
the workers always turn it off. Other load on the machine shows in the wall times. The last line
also gives cpu_seconds_ratio, the single-process run's CPU seconds over the parallel run's spread
over its processes: the ratio to expect with a free CPU per process, which a shared machine's
wall times cannot show.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lrc_src.cli import int_at_least
from lrc_src.corpora import load_documents
from lrc_src.mix import open_mix
from lrc_src.packing import prepare_data
from lrc_src.teachers import smollm2_tokenizer

MIX = {"fineweb_edu": 18, "dclm": 2, "cosmopedia_v2": 1, "openhermes": 0.5}  # the paper's weights
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have "
    "not they their one all has been more can we when there were so some these what if about "
    "into time only other than then its two also many first new could may like after would "
    "model data learning train student teacher layer weight matrix vector token text"
).split()


def source_texts(kind: str, n_chars: int, seed: int = 0) -> list[str]:
    """At least ``n_chars`` characters of documents: the python-docs corpus, cycled, or seeded
    synthetic prose."""
    out, total = [], 0
    if kind == "python-docs":
        docs = [d["text"] for d in load_documents("python-docs")]
        while total < n_chars:
            for text in docs:
                out.append(f"({len(out)}) {text}")
                total += len(out[-1])
                if total >= n_chars:
                    break
        return out
    rng = np.random.default_rng(seed)
    while total < n_chars:
        sentences = []
        for _ in range(int(rng.integers(5, 60))):
            words = rng.choice(WORDS, size=int(rng.integers(4, 25)))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", ", 42."]))
        out.append(" ".join(sentences))
        total += len(out[-1])
    return out


def write_mix(folder: Path, texts: list[str]) -> dict:
    """Share the documents among the four sources by weight, as hub-schema .jsonl stand-ins."""
    names = list(MIX)
    p = np.array([MIX[n] for n in names]) / sum(MIX.values())
    which = np.random.default_rng(0).choice(len(names), size=len(texts), p=p)
    files = {name: open(folder / f"{name}.jsonl", "w", encoding="utf-8") for name in names}
    for text, i in zip(texts, which):
        name = names[i]
        if name == "fineweb_edu":
            record = {"text": text, "metadata": {"int_score": 4}}
        elif name == "openhermes":
            half = len(text) // 2
            record = {"conversations": [{"from": "human", "value": text[:half]}, {"from": "gpt", "value": text[half:]}]}
        else:
            record = {"text": text}
        files[name].write(json.dumps(record, ensure_ascii=False) + "\n")
    for f in files.values():
        f.close()
    return {name: str(folder / f"{name}.jsonl") for name in names}


def timed_prepare(tokenizer, spec: dict, cache: Path, num_proc: int, seq_len: int):
    os.environ["LRC_CACHE"] = str(cache)
    own0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    packed = prepare_data(tokenizer, spec, seq_len, heldout_frac=0.02, seed=0, num_proc=num_proc)
    wall = time.perf_counter() - start
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime - own0.ru_utime - own0.ru_stime
    kids_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
    tokens = packed.meta["train_tokens_tokenised"] + packed.meta["heldout_tokens_tokenised"]
    return packed, tokens, wall, cpu, kids_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=128.0, help="MB of text in the stand-in mix (default 128)")
    ap.add_argument(
        "--procs", type=int_at_least(2), default=2, help="worker processes of the parallel run (>= 2, default 2)"
    )
    ap.add_argument(
        "--text",
        choices=("python-docs", "synthetic"),
        default="python-docs",
        help="documents: the python-docs corpus (built in the cache if missing), or synthetic prose",
    )
    ap.add_argument("--seq-len", type=int_at_least(1), default=2048, help="tokens per packed block (default 2048)")
    ap.add_argument(
        "--cpus",
        default=None,
        help="pin this process and its workers to these CPUs, e.g. 0-1 or 0,2 (default: as started)",
    )
    ap.add_argument(
        "--work", default=None, help="folder for the stand-in files and caches (default: a temp folder, removed)"
    )
    args = ap.parse_args(argv)
    if not args.mb > 0:
        ap.error(f"--mb must be > 0, got {args.mb}")
    if args.cpus:
        cpus = set()
        try:
            for part in args.cpus.split(","):
                lo, _, hi = part.partition("-")
                cpus.update(range(int(lo), int(hi or lo) + 1))
            os.sched_setaffinity(0, cpus)
        except (ValueError, OSError) as e:
            ap.error(f"--cpus {args.cpus!r}: {e}")

    work = Path(args.work or tempfile.mkdtemp(prefix="lrc_tokenise_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = smollm2_tokenizer()
        texts = source_texts(args.text, int(args.mb * 1e6))
        (work / "mix").mkdir(exist_ok=True)
        spec = {"mix": MIX, "data_files": write_mix(work / "mix", texts)}
        chars = sum(map(len, texts))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"{chars / 1e6:.1f}M characters ({args.text}) in {len(texts)} documents; {cpus} CPUs; "
            f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        # one-time costs (imports, the chat template's compilation) out of the first timed run
        tokenizer([d["text"] for d in itertools.islice(open_mix(spec, tokenizer, seed=0), 200)])
        runs = {}
        for num_proc in (1, args.procs):
            packed, tokens, wall, cpu, kids_cpu = timed_prepare(
                tokenizer, spec, work / f"cache_{num_proc}", num_proc, args.seq_len
            )
            runs[num_proc] = (packed, tokens / wall, cpu, kids_cpu)
            print(
                f"num_proc={num_proc}: {tokens:,} tokens in {wall:.1f} s = {tokens / wall:,.0f} tokens/s "
                f"(CPU s: this process {cpu:.1f}, workers {kids_cpu:.1f}; load average "
                f"{os.getloadavg()[0]:.2f})",
                flush=True,
            )
        (one, rate_one, cpu_one, _), (par, rate_par, cpu_main, cpu_workers) = runs[1], runs[args.procs]
        same = all(
            (one.directory / f).read_bytes() == (par.directory / f).read_bytes()
            for f in ("train.npy", "heldout.npy", "heldout.jsonl")
        )
        # what the parallel run would take with a CPU per process: its CPU seconds spread over the
        # processes (workers evenly loaded), or the feeding process's own, whichever is longer
        cpu_ratio = cpu_one / max((cpu_main + cpu_workers) / args.procs, cpu_main)
        print(f"same bytes: {same}")
        print(
            f"tokens_per_s_1={rate_one:.0f} tokens_per_s_{args.procs}={rate_par:.0f} ratio={rate_par / rate_one:.2f} "
            f"cpu_seconds_ratio={cpu_ratio:.2f}"
        )
        return 0 if same else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
