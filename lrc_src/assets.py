"""A config's inputs: the teacher (or, for sft, the model fine-tuned), its tokenizer and the
tokenised blocks (`load_inputs`), and `prepare_assets`, which fetches and caches them once per
profile so that parallel runs reuse the caches (`lrc prepare`).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from lrc_src.analysis import heldout_loss
from lrc_src.config import ExperimentConfig
from lrc_src.fileio import atomic_write_bytes, atomic_write_text, check_output_folder
from lrc_src.runtime import resolve_mixed_precision, set_threads


def load_inputs(cfg: ExperimentConfig):
    """(teacher, tokenizer, train blocks [N, T], train labels or None, held-out blocks) for cfg.

    For method=sft the "teacher" is the model being fine-tuned and the blocks are chat examples."""
    from lrc_src.teachers import check_context, load_teacher  # heavy deps load only when training

    if cfg.method == "sft":
        from transformers import AutoTokenizer

        from lrc_src.baselines import load_causal_lm
        from lrc_src.chat import encode_chat_file

        if not cfg.sft.chat_data:
            raise ValueError("method=sft needs sft.chat_data (a jsonl of {'messages': [...]})")
        model = load_causal_lm(cfg.sft.model)
        check_context(model, cfg.data.seq_len, name=cfg.sft.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.sft.model)
        ids, labels = encode_chat_file(tokenizer, cfg.sft.chat_data, cfg.data.seq_len)
        n_held = max(1, int(round(len(ids) * cfg.data.heldout_frac)))
        if n_held >= len(ids):
            raise ValueError(f"sft.chat_data {cfg.sft.chat_data!r} has too few conversations ({len(ids)})")
        return model, tokenizer, ids[n_held:], labels[n_held:], ids[:n_held]
    teacher, tokenizer = load_teacher(cfg.teacher)
    check_context(teacher, cfg.data.seq_len, name=cfg.teacher)
    data = packed_data(cfg, tokenizer)
    return teacher, tokenizer, data.train, None, data.heldout


def packed_data(cfg: ExperimentConfig, tokenizer, corpus: list[str] | None = None):
    """The tokenised, packed corpus of cfg.data (cached on disk by lrc_src.packing); `corpus`
    replaces cfg.data's corpus or mix (same seq_len, held-out split and cap)."""
    from lrc_src.packing import prepare_data

    if corpus is None:
        corpus = {"mix": cfg.data.mix, "data_files": cfg.data.mix_files or {}} if cfg.data.mix else cfg.data.corpus
    return prepare_data(
        tokenizer,
        corpus,
        cfg.data.seq_len,
        heldout_frac=cfg.data.heldout_frac,
        seed=cfg.data.seed,
        max_train_tokens=cfg.data.max_train_tokens,
    )


def prepare_assets(cfg: ExperimentConfig, output_dir: str | Path, threads: int | None = None) -> dict:
    """Fetch/convert the teacher and tokenise the data once for a profile, so that parallel runs
    reuse the caches. Writes output_dir/assets.json (teacher folder, held-out documents, token
    counts, the teacher's held-out loss on the same blocks the runs evaluate) and a copy of the
    held-out documents as output_dir/heldout.jsonl."""
    from lrc_src.teachers import teacher_folder

    set_threads(threads)
    out = Path(output_dir)
    check_output_folder(out, "--output-dir")
    link = out / "teacher"  # a stable path to the teacher's HF folder, for `lrc eval`
    if link.exists() and not link.is_symlink():
        raise ValueError(f"{str(link)!r} exists and is not the link lrc prepare writes there; move it away")
    teacher, tokenizer, train_blocks, _, heldout = load_inputs(cfg)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision))
    n = cfg.train.eval_batches * cfg.train.batch_size
    info = {
        "teacher": cfg.teacher,
        "teacher_folder": str(teacher_folder(cfg.teacher)) if cfg.method != "sft" else cfg.sft.model,
        "train_blocks": int(len(train_blocks)),
        "heldout_blocks": int(len(heldout)),
        "seq_len": cfg.data.seq_len,
        "teacher_heldout_loss": heldout_loss(teacher, heldout[:n], cfg.train.batch_size, accelerator),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path(info["teacher_folder"]).resolve(), target_is_directory=True)
    if cfg.method != "sft":
        src = packed_data(cfg, tokenizer).heldout_path  # cached: returns at once
        atomic_write_bytes(out / "heldout.jsonl", Path(src).read_bytes())
        info["heldout_path"] = str((out / "heldout.jsonl").resolve())
    atomic_write_text(out / "assets.json", json.dumps(info, indent=2))
    return info
