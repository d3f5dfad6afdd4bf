"""Scoring a saved causal LM with lm-evaluation-harness (lm-eval): ``lrc eval``.

Everything that scores a model goes through :func:`lm_eval.simple_evaluate` with the ``hf``
backend (``pretrained=DIR, dtype=float32``); this module checks the inputs up front, runs the
harness on a suite of :mod:`lrc_src.suites` and turns its results into one tidy CSV. It never
re-implements what the harness does. The hub suites are checked for their datasets before the
harness starts (:func:`lrc_src.suites.check_hub_datasets`); the tiny suite runs on the data built
by :mod:`lrc_src.tiny_suite`, with hub access turned off.

Output: one row per (model, suite, task, metric), columns :data:`COLUMNS`, rows sorted, written
atomically (temporary file + rename) so that a failed run never leaves half a CSV.

Command line: ``lrc eval`` (options from :func:`add_eval_arguments`, run by
:func:`run_eval_from_args`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from lrc_src.cli import int_at_least
from lrc_src.fileio import check_output_file, write_csv_atomic
from lrc_src.hub import hub_offline
from lrc_src.suites import (
    SUITES,
    SuiteSpec,
    check_hub_datasets,
    get_suite,
)
from lrc_src.tiny_suite import build_tiny_suite, load_tiny_manifest

if TYPE_CHECKING:  # pandas is imported lazily: `import lrc_src.harness` stays cheap
    import pandas as pd

log = logging.getLogger(__name__)

#: Columns of the results CSV, in order.
COLUMNS: tuple[str, ...] = (
    "model",
    "suite",
    "task",
    "metric",
    "value",
    "stderr",
    "num_fewshot",
    "limit",
    "n",
)


# --------------------------------------------------------------------------- input checks


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that ``model_dir`` is a saved Hugging Face causal LM; return its resolved path.

    Cheap checks only (no weights are loaded), done before the harness starts:

    * the folder exists (else ``FileNotFoundError``);
    * it holds a ``config.json`` (else ``FileNotFoundError``);
    * the config is a causal-LM one: its ``model_type`` has an ``AutoModelForCausalLM`` class
      and its ``architectures`` (when listed) include a ``...ForCausalLM``/``...LMHeadModel``;
      encoder models such as BERT are refused (``ValueError``);
    * weights and a tokenizer (one of :data:`lrc_src.teachers.TOKENIZER_FILES`) are there
      (``FileNotFoundError``).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from lrc_src.teachers import TOKENIZER_FILES  # here: it imports torch

    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"model path is not a folder: {path}")
    path = path.resolve()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a model config (not a JSON object)")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.get("is_encoder_decoder", False)
    if is_causal and architectures:
        is_causal = any(
            arch in causal_classes or arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures
        )
    elif is_causal and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # encoder families (bert, roberta, ...) only act as causal LMs when built as decoders
        is_causal = bool(config.get("is_decoder", False))
    if not is_causal:
        arch_text = ", ".join(architectures) if architectures else "no architectures listed"
        raise ValueError(
            f"{path} is not a causal language model (model_type={model_type!r}, {arch_text}); "
            "lm-eval's hf backend needs an AutoModelForCausalLM folder"
        )
    weight_files = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    if not any((path / name).is_file() for name in weight_files):
        raise FileNotFoundError(f"{path} has no model weights (model.safetensors or pytorch_model.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path


# --------------------------------------------------------------------------- evaluation


def _float(value: Any) -> float:
    """A harness number as float; ``"N/A"``/None (no stderr) -> NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _leaf_tasks(results: Mapping[str, Any], name: str) -> list[str]:
    """The leaf tasks under a task or group name, from the harness's ``group_subtasks``."""
    groups = results.get("group_subtasks", {}) or {}
    if name not in groups:
        return [name]
    return [leaf for sub in groups[name] for leaf in _leaf_tasks(results, sub)]


def results_to_frame(
    results: Mapping[str, Any],
    suite: str | SuiteSpec,
    model: str,
    limit: int | float | None = None,
) -> pd.DataFrame:
    """Turn ``lm_eval.simple_evaluate``'s results into the tidy table (columns :data:`COLUMNS`).

    One row per reported (task, metric) of the suite, plus the ``average`` row when the suite
    has one (``mean`` of the reported values; stderr ``sqrt(sum se^2) / k``). ``n`` is the number
    of documents scored (summed over a group's subtasks); ``stderr`` is NaN where the harness
    gives none (perplexities). Rows are sorted by model, suite, task, metric.
    """
    import pandas as pd

    spec = suite if isinstance(suite, SuiteSpec) else get_suite(suite)
    scores = results.get("results", {})
    n_shot = results.get("n-shot", {}) or {}
    n_samples = results.get("n-samples", {}) or {}
    rows = []
    for task, metrics in spec.tasks:
        if task not in scores:
            raise RuntimeError(f"lm-eval returned no results for task {task!r}")
        leaves = _leaf_tasks(results, task)
        n = sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves)
        shots = n_shot.get(task, n_shot.get(leaves[0], spec.num_fewshot))
        for metric in metrics:
            key = f"{metric},none"
            if key not in scores[task]:
                raise RuntimeError(f"lm-eval returned no {metric!r} for task {task!r}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": _float(scores[task][key]),
                    "stderr": _float(scores[task].get(f"{metric}_stderr,none")),
                    "num_fewshot": int(shots),
                    "n": n,
                }
            )
    if spec.average and rows:
        values = [row["value"] for row in rows]
        errors = [row["stderr"] for row in rows]
        rows.append(
            {
                "task": "average",
                "metric": "mean",
                "value": sum(values) / len(values),
                "stderr": math.sqrt(sum(e * e for e in errors)) / len(errors),
                "num_fewshot": spec.num_fewshot,
                "n": sum(row["n"] for row in rows),
            }
        )
    frame = pd.DataFrame(rows)
    frame.insert(0, "model", model)
    frame.insert(1, "suite", spec.name)
    frame["limit"] = limit if limit is not None else math.nan
    frame = frame[list(COLUMNS)].sort_values(["model", "suite", "task", "metric"])
    return frame.reset_index(drop=True)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> str:
    """``device`` if torch knows it and it is present (lm-eval would fall back to its own default)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available")
    return device


def _check_limit(limit: int | float | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"limit must be a positive number of documents (or a fraction < 1), got {limit!r}")
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise ValueError(f"limit >= 1 must be a whole number of documents, got {limit!r}")


def evaluate(
    model_dir: str | Path,
    suite: str,
    limit: int | float | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    model_name: str | None = None,
    *,
    heldout: str | Path | None = None,
) -> pd.DataFrame:
    """Evaluate the saved causal LM in ``model_dir`` on ``suite`` with lm-eval.

    Args:
        model_dir: a Hugging Face model folder (config.json, weights, tokenizer).
        suite: one of :data:`SUITES` (``paper``, ``paper-5shot``, ``safety``, ``tiny``).
        limit: documents per task (lm-eval ``limit``; a float < 1 is a fraction). For smoke
            tests only: the paper's numbers use every document.
        batch_size: harness batch size.
        output: CSV path to write (atomically); None writes nothing.
        device: torch device (default ``cuda`` when available, else ``cpu``).
        data_dir: the built tiny suite (see :func:`build_tiny_suite`); tiny suite only.
        model_name: the ``model`` column (default: the folder's name).
        heldout: tiny suite only: build (or reuse) the tiny suite from this held-out file into
            ``data_dir`` (default ``<heldout's folder>/tiny_suite``) first.

    Returns:
        The tidy results table (columns :data:`COLUMNS`), also written to ``output``.

    Raises:
        ValueError: unknown suite, bad limit, or a folder that is not a causal LM.
        FileNotFoundError: missing model folder/config/weights/tokenizer or tiny-suite data.
        HubDatasetsUnavailable: a hub suite while the hub is off or unreachable and its datasets
            are not cached (checked before the harness starts).
    """
    spec = get_suite(suite)
    model_path = check_model_dir(model_dir)
    _check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if output is not None:
        check_output_file(output, "--output")
    device = _check_device(device or _default_device())
    if spec.local:
        if heldout is not None:
            target = data_dir if data_dir is not None else Path(heldout).parent / "tiny_suite"
            data_dir = build_tiny_suite(heldout, target)
        if data_dir is None:
            raise ValueError(
                "the tiny suite needs its data: pass data_dir/--data-dir (a folder built by "
                "build_tiny_suite) or heldout/--heldout (a held-out .jsonl to build it from)"
            )
        data_dir = Path(data_dir).expanduser().resolve()
        load_tiny_manifest(data_dir)
        context: contextlib.AbstractContextManager = hub_offline()
    else:
        if data_dir is not None or heldout is not None:
            raise ValueError(f"data_dir/heldout only apply to the tiny suite, not {spec.name!r}")
        check_hub_datasets(spec)
        context = contextlib.nullcontext()

    name = model_name or model_path.name
    started = time.perf_counter()
    with context:
        import lm_eval
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(data_dir), include_defaults=False) if spec.local else TaskManager()
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", _git_hash_quietly):
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_path), "dtype": "float32"},
                tasks=spec.task_names,
                num_fewshot=spec.num_fewshot,
                batch_size=batch_size,
                device=device,
                limit=limit,
                task_manager=task_manager,
                log_samples=False,
                apply_chat_template=False,
            )
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    frame = results_to_frame(results, spec, name, limit)
    log.info("%s on suite %s: %.1f s", name, spec.name, time.perf_counter() - started)
    if output is not None:
        write_csv_atomic(frame, output)
    return frame


def _git_hash_quietly() -> str | None:
    """lm-eval's `get_git_commit_hash` (the working directory's commit, which lm-eval records and
    this project does not read) without git's "fatal: not a git repository" on the terminal when
    the working directory is not a checkout: that line read as if the evaluation had failed."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        from lm_eval.loggers.utils import get_commit_from_path

        return get_commit_from_path(os.getcwd())  # lm-eval's own fallback: .git read as files
    return done.stdout.strip()


# --------------------------------------------------------------------------- command line


def _limit_arg(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return int(value) if value.is_integer() and value >= 1 else value


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lrc eval`` options to ``parser`` (returned for chaining)."""
    suites = "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="Hugging Face causal-LM folder (config.json, weights, tokenizer)"
    )
    parser.add_argument(
        "--suite", required=True, metavar="NAME", choices=list(SUITES), help=f"benchmark suite. {suites}"
    )
    parser.add_argument(
        "--limit",
        type=_limit_arg,
        default=None,
        metavar="N",
        help="score only the first N documents per task (smoke tests; a value < 1 is a fraction). Default: all",
    )
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=8, metavar="B", help="lm-eval batch size (default: 8)"
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="FILE.csv",
        help=f"tidy CSV to write: one row per (model, suite, task, metric) with columns {', '.join(COLUMNS)}",
    )
    parser.add_argument(
        "--heldout",
        default=None,
        metavar="FILE.jsonl",
        help='tiny suite: held-out documents ({"text": ...} per line) to build '
        "the suite's data from (reused when already built)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="tiny suite: folder of the built suite data (default with --heldout: <heldout folder>/tiny_suite)",
    )
    parser.add_argument(
        "--device", default=None, metavar="DEVICE", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    parser.add_argument(
        "--model-name", default=None, metavar="NAME", help="value of the CSV's model column (default: the folder name)"
    )
    return parser


def run_eval_from_args(args: argparse.Namespace) -> int:
    """Run :func:`evaluate` from parsed :func:`add_eval_arguments` options; return an exit code.

    Input errors (missing/non-causal model folder, unknown suite, tiny-suite data missing, hub
    datasets unavailable) raise; ``lrc`` prints them as one ``lrc: error:`` line, as for its other
    commands.
    """
    frame = evaluate(
        args.model,
        args.suite,
        limit=args.limit,
        batch_size=args.batch_size,
        output=args.output,
        device=args.device,
        data_dir=args.data_dir,
        model_name=getattr(args, "model_name", None),
        heldout=args.heldout,
    )
    print(frame.to_string(index=False))
    print(f"wrote {args.output}")
    card = update_student_card(args.model, frame)
    if card is not None:
        print(f"updated the model card {card}")
    return 0


def update_student_card(model_dir: str | Path, frame: pd.DataFrame) -> Path | None:
    """When `model_dir` is a run's exported student, keep this evaluation beside its weights
    (`student/evals/<suite>.csv`) and rewrite its model card to show it; None otherwise."""
    from lrc_src.card import EVALS_DIR, run_of_student, write_model_card

    run = run_of_student(model_dir)
    if run is None or frame.empty:
        return None
    suite = str(frame["suite"].iloc[0])
    write_csv_atomic(frame, run / "student" / EVALS_DIR / f"{suite}.csv")
    return write_model_card(run)
