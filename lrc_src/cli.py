"""Command line: `lrc train`, `lrc prepare`, `lrc export`, `lrc tiny-suite`, `lrc eval`, `lrc samples`.

    lrc train --config config/tiny.yaml --output-dir runs/tiny-lrc [--set train.max_tokens=10240 ...]
    accelerate launch -m lrc_src.cli train --config config/paper-lrc-1.5b.yaml --output-dir runs/lrc-1.5b
    lrc export --run runs/tiny-lrc --output exported/
    lrc tiny-suite --heldout assets/heldout.jsonl --output assets/tiny_suite
    lrc eval --model runs/tiny-lrc/student --suite tiny --data-dir assets/tiny_suite --output eval.csv
    lrc samples --model teacher=assets/teacher --model lrc=runs/tiny-lrc/student --heldout assets/heldout.jsonl \
        --output samples.csv

User errors (bad config, missing files, bad values) print one line `lrc: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from lrc_src.config import load_config
    from lrc_src.train import train

    # --compile is train.compile=on, so config.yaml records what the run does
    cfg = load_config(args.config, [*args.set, "train.compile=on"] if args.compile else args.set)
    out = train(
        cfg,
        args.output_dir,
        progress=not args.no_progress,
        threads=args.threads,
        restart_on_config_change=args.restart_on_config_change,
        keep_memory=not args.return_freed_memory,
    )
    if os.environ.get("RANK", "0") == "0":  # once for a data-parallel launch
        print(f"run complete: {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from lrc_src.assets import prepare_assets
    from lrc_src.config import load_config

    info = prepare_assets(load_config(args.config, args.set), args.output_dir, threads=args.threads)
    print(f"teacher held-out loss {info['teacher_heldout_loss']:.4f}; wrote {args.output_dir}/assets.json")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Rebuild the method from a run folder's config + checkpoint and export the student."""
    from lrc_src.train import export_run

    run = Path(args.run)
    export_run(run, args.output)
    if (run / "run.json").is_file() and (run / "student" / "config.json").is_file():
        from lrc_src.card import CARD_NAME, model_card
        from lrc_src.fileio import atomic_write_text

        atomic_write_text(Path(args.output) / CARD_NAME, model_card(run))  # the finished run's card
    print(f"exported student: {args.output}")
    return 0


def _tiny_suite(args: argparse.Namespace) -> int:
    """Build the offline tiny eval suite from a held-out file (deterministic for a given seed)."""
    from lrc_src.fileio import check_output_folder
    from lrc_src.tiny_suite import build_tiny_suite

    check_output_folder(args.output, "--output")
    folder = build_tiny_suite(args.heldout, Path(args.output), seed=args.seed)
    print(f"tiny suite (seed {args.seed}) from {args.heldout}: {folder}")
    return 0


def _samples(args: argparse.Namespace) -> int:
    """Greedy continuations of a fixed prompt set by each --model, as one CSV."""
    from lrc_src.fileio import check_output_file, write_csv_atomic
    from lrc_src.samples import INSTRUCTIONS, sample_prompts, samples_frame

    check_output_file(args.output, "--output")
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--model {spec!r} is not NAME=FOLDER")
        if name in models:
            raise ValueError(f"--model {spec!r}: the name {name!r} is given twice")
        models[name] = folder
    if args.instructions > len(INSTRUCTIONS):
        raise ValueError(f"--instructions {args.instructions}: there are {len(INSTRUCTIONS)}")
    prompts = sample_prompts(
        args.heldout, n_heldout=args.heldout_prompts, seed=args.seed, instructions=INSTRUCTIONS[: args.instructions]
    )
    frame = samples_frame(models, prompts, max_new_tokens=args.max_new_tokens)
    write_csv_atomic(frame, args.output)
    print(f"{len(frame)} samples from {len(models)} model(s): {args.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lrc_src.harness import run_eval_from_args

    return run_eval_from_args(args)


def int_at_least(minimum: int):
    """argparse type of the options that count something: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _add_config_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """--config, --set, --output-dir, --threads: shared by `train` and `prepare`."""
    parser.add_argument(
        "--config", required=True, help="training config (YAML), e.g. config/tiny.yaml (not a workflow profile)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_tokens=10240 --set lrc.alpha=0.5 "
        "(repeatable; values are YAML)",
    )
    parser.add_argument("--output-dir", required=True, help=output_help)
    parser.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrc", description="Low-Rank Clone distillation: train, export, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train LRC or a baseline (resumes if --output-dir has a checkpoint)",
        description="Train the method named in the config (lrc, scratch, kd, tinybert, prune_kd, "
        "sft). Re-running the same command on the same --output-dir resumes from its "
        "last checkpoint. Multi-GPU: accelerate launch -m lrc_src.cli train ...",
    )
    _add_config_arguments(t, "run folder (metrics.csv, checkpoint/, student/)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument(
        "--restart-on-config-change",
        action="store_true",
        help="if --output-dir holds a run of a different config, delete it and start again "
        "(default: refuse); the Snakemake workflow passes it",
    )
    t.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="on the CPU, let freed memory go back to the OS as glibc does by default (lower "
        "resident memory between steps); by default it is kept for the next step, so that "
        "steps do not page-fault their working set in again (lrc_src.runtime.keep_freed_memory)",
    )
    t.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder layers (teacher and student side by side for LRC; one graph "
        "for all layers) and, with CUDA, the fused head's softmax / KL work: fused elementwise "
        "kernels, less Python per layer; the first step compiles (seconds to minutes). Same as "
        "--set train.compile=on (default auto: on with CUDA, and on the CPU for runs of at least "
        "1,000 steps); a run resumes with or without it",
    )
    t.set_defaults(func=_train)

    pr = sub.add_parser(
        "prepare",
        help="fetch the teacher and tokenise the data of a config once",
        description="Convert/fetch the teacher, build and tokenise the corpus (cached), and "
        "write OUTPUT_DIR/assets.json (teacher folder, held-out documents, the "
        "teacher's held-out loss), OUTPUT_DIR/heldout.jsonl (not for method=sft, whose data is "
        "sft.chat_data) and OUTPUT_DIR/teacher, a link to the teacher's folder (replaced on each run).",
    )
    _add_config_arguments(pr, "folder for assets.json, heldout.jsonl and the teacher link")
    pr.set_defaults(func=_prepare)

    e = sub.add_parser(
        "export",
        help="export the student of a run's checkpoint as a plain HF folder",
        description="Materialise the student from a run folder's last checkpoint into a plain "
        "Hugging Face folder (safetensors, config, tokenizer) that loads with "
        "AutoModelForCausalLM.from_pretrained and no custom code.",
    )
    e.add_argument("--run", required=True, help="run folder written by `lrc train`")
    e.add_argument("--output", required=True, help="a new folder to write the student to (an existing one is refused)")
    e.set_defaults(func=_export)

    s = sub.add_parser(
        "tiny-suite",
        help="build the offline tiny eval suite from a held-out file",
        description="Write the tiny suite's task data, lm-eval task YAMLs and manifest.json into "
        "OUTPUT, sampled from the held-out documents (and the MMLU test set) with SEED. "
        "The same inputs and seed give the same bytes; a built suite is reused as is. "
        "Pass OUTPUT to `lrc eval --suite tiny --data-dir`.",
    )
    s.add_argument(
        "--heldout",
        required=True,
        metavar="FILE.jsonl",
        help='held-out documents, {"text": ...} per line (lrc prepare writes OUTPUT_DIR/heldout.jsonl)',
    )
    s.add_argument("--output", required=True, metavar="DIR", help="folder to write the suite to (created)")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    s.set_defaults(func=_tiny_suite)

    g = sub.add_parser(
        "samples",
        help="greedy continuations of a fixed prompt set by several models, as a CSV",
        description="For each model (an HF folder: a run's student/ or a teacher), the greedy "
        "continuation of the same prompts: the openings of held-out documents chosen "
        "by SEED, then a few plain instructions (through the chat template when the "
        "tokenizer has one). Writes OUTPUT with columns model, kind, prompt, output.",
    )
    g.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=FOLDER",
        help="a model to sample (repeatable), e.g. --model lrc=runs/lrc/student",
    )
    g.add_argument("--heldout", required=True, metavar="FILE.jsonl", help='held-out documents, {"text": ...} per line')
    g.add_argument(
        "--heldout-prompts",
        type=int_at_least(0),
        default=2,
        metavar="N",
        help="prompts cut from held-out documents of at least 48 words (default %(default)s)",
    )
    g.add_argument(
        "--instructions",
        type=int_at_least(0),
        default=2,
        metavar="N",
        help="plain instructions to add, at most 3 (default %(default)s)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=24,
        metavar="N",
        help="greedy tokens per prompt (default %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="which held-out documents give the prompts (default %(default)s)"
    )
    g.add_argument("--output", required=True, help="CSV to write")
    g.set_defaults(func=_samples)

    from lrc_src.harness import add_eval_arguments

    v = sub.add_parser(
        "eval",
        help="evaluate an HF model folder with lm-eval on a task suite",
        description="Evaluate a model folder with lm-eval (hf backend) on a suite: tiny (offline), "
        "paper, paper-5shot, safety (hub). Writes a tidy CSV.",
    )
    add_eval_arguments(v)
    v.set_defaults(func=_eval)
    return p


def _quiet_libraries() -> None:
    """Our progress bars only: silence transformers' per-load bars and info logs."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _one_line(error: Exception) -> str:
    """An error's message on one line (a library's own messages may span several)."""
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lrc: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. no permission, a full disk: one line, not a traceback
        print(f"lrc: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lrc: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if type(e).__name__ in ("NonFiniteLossError", "HubDatasetsUnavailable"):
            print(f"lrc: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
