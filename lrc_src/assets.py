"""A config's inputs: the teacher (or, for sft, the model fine-tuned) and its tokenizer
(`load_models`), with the tokenised blocks (`load_inputs`), and `prepare_assets`, which fetches and
caches them once per profile so that parallel runs reuse the caches (`lrc prepare`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrc_src.analysis import heldout_loss
from lrc_src.config import ExperimentConfig
from lrc_src.fileio import atomic_write_bytes, atomic_write_text, check_output_folder
from lrc_src.runtime import make_accelerator, set_threads
from lrc_src.teachers import (
    check_context,
    fingerprint,
    load_model_folder,
    load_teacher,
    load_tokenizer,
    teacher_folder,
)


@dataclass
class Inputs:
    """What a config trains on. `identity` names it, for a checkpoint to record: a run continues only
    with the teacher and the data it started with (a corpus edited or a relative path read from
    another folder would otherwise go on silently with other inputs)."""

    teacher: torch.nn.Module  # for sft: the model being fine-tuned
    tokenizer: object
    train: np.ndarray  # [N, T] token ids
    labels: np.ndarray | None  # sft: [N, T] with the prompt tokens masked; else None
    heldout: np.ndarray  # [M, T]
    data: str  # the token cache's key (its corpus's documents, tokenizer, seq_len, split and cap)

    def identity(self) -> dict[str, str]:
        return {"teacher": fingerprint(self.teacher), "data": self.data}


def load_models(cfg: ExperimentConfig):
    """(teacher, tokenizer) of cfg, checked against data.seq_len; for method=sft the model being
    fine-tuned and its tokenizer."""
    if cfg.method == "sft":
        if not cfg.sft.chat_data:
            raise ValueError("method=sft needs sft.chat_data (a jsonl of {'messages': [...]})")
        model = load_model_folder(cfg.sft.model)
        tokenizer = load_tokenizer(cfg.sft.model, name=cfg.sft.model)
    else:
        model, tokenizer = load_teacher(cfg.teacher)
    check_context(model, cfg.data.seq_len, name=cfg.sft.model if cfg.method == "sft" else cfg.teacher)
    return model, tokenizer


def load_inputs(cfg: ExperimentConfig, progress: bool = True) -> Inputs:
    """The teacher, its tokenizer and the tokenised blocks of cfg (progress: a bar while tokenising).
    For method=sft the "teacher" is the model being fine-tuned and the blocks are chat examples."""
    model, tokenizer = load_models(cfg)
    if cfg.method == "sft":
        from lrc_src.chat import encode_chat_file

        ids, labels = encode_chat_file(tokenizer, cfg.sft.chat_data, cfg.data.seq_len)
        n_held = max(1, int(round(len(ids) * cfg.data.heldout_frac)))
        if n_held >= len(ids):
            raise ValueError(f"sft.chat_data {cfg.sft.chat_data!r} has too few conversations ({len(ids)})")
        key = hashlib.sha256(np.ascontiguousarray(ids).tobytes() + np.ascontiguousarray(labels).tobytes())
        return Inputs(model, tokenizer, ids[n_held:], labels[n_held:], ids[:n_held], key.hexdigest()[:20])
    data = packed_data(cfg, tokenizer, progress=progress)
    if len(data.heldout) == 0:  # the held-out loss would be nan, in every log row and in the card
        meta = data.meta
        raise ValueError(
            f"the held-out documents ({meta.get('heldout_documents', '?')}) hold "
            f"{meta.get('heldout_tokens_tokenised', '?')} tokens, less than one block of "
            f"data.seq_len={cfg.data.seq_len}: raise data.heldout_frac (or give longer documents) or lower data.seq_len"
        )
    return Inputs(model, tokenizer, data.train, None, data.heldout, data.meta["key"])


def packed_data(cfg: ExperimentConfig, tokenizer, corpus: list[str] | None = None, progress: bool = True):
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
        progress=progress,
    )


def prepare_assets(cfg: ExperimentConfig, output_dir: str | Path, threads: int | None = None) -> dict:
    """Fetch/convert the teacher and tokenise the data once for a profile, so that parallel runs
    reuse the caches. Writes output_dir/assets.json (teacher folder, held-out documents, token
    counts, the teacher's held-out loss on the same blocks the runs evaluate) and a copy of the
    held-out documents as output_dir/heldout.jsonl."""
    set_threads(threads)
    out = Path(output_dir)
    check_output_folder(out, "--output-dir")
    link = out / "teacher"  # a stable path to the teacher's HF folder, for `lrc eval`
    if link.exists() and not link.is_symlink():
        raise ValueError(f"{str(link)!r} exists and is not the link lrc prepare writes there; move it away")
    inputs = load_inputs(cfg)
    teacher, heldout = inputs.teacher, inputs.heldout
    accelerator = make_accelerator(cfg.train.mixed_precision)
    n = cfg.train.eval_batches * cfg.train.batch_size
    info = {
        "teacher": cfg.teacher,
        "teacher_folder": str(teacher_folder(cfg.teacher)) if cfg.method != "sft" else cfg.sft.model,
        "train_blocks": int(len(inputs.train)),
        "heldout_blocks": int(len(heldout)),
        "seq_len": cfg.data.seq_len,
        "teacher_heldout_loss": heldout_loss(teacher, heldout[:n], cfg.train.batch_size, accelerator),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path(info["teacher_folder"]).resolve(), target_is_directory=True)
    if cfg.method != "sft":
        src = packed_data(cfg, inputs.tokenizer).heldout_path  # cached: returns at once
        atomic_write_bytes(out / "heldout.jsonl", Path(src).read_bytes())
        info["heldout_path"] = str((out / "heldout.jsonl").resolve())
    atomic_write_text(out / "assets.json", json.dumps(info, indent=2))
    return info
