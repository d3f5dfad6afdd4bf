"""Measurements on trained models for the paper's analysis items.

Each function measures one thing on a plain HF causal LM (Llama/Qwen2/Mistral layout:
`model.model.layers[i].mlp.{gate,up,down}_proj`) or on a saved trainable state; the notebooks
`figure4_tokens`, `table4_data_mix`, `table5_neuron_masking`, `table21_singular_values` and
`table22_gram_mse` call them and only tabulate, assert and plot.

Notation: L layers, FFN width d_mid (not pruned by LRC, so the teacher's and the student's FFN
neuron j of layer i are the same index), hidden sizes d_T (teacher) and d_S (student).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lrc_src.losses import lm_loss

# ---------------------------------------------------------------- loading


def load_model(path: str | Path):
    """A saved HF causal LM (`lrc_src.teachers.load_model_folder`) in fp32, eval mode, no gradients."""
    from lrc_src.teachers import load_model_folder

    return load_model_folder(path, torch.float32).eval().requires_grad_(False)


def heldout_blocks(
    config_path: str | Path, tokenizer_dir: str | Path, corpus: list[str] | None = None, n_blocks: int | None = None
) -> np.ndarray:
    """Held-out blocks [N, T] of a run's data config (its config.yaml), from the token cache.

    corpus: replace the run's `data.corpus` (same seq_len, heldout_frac, seed, max_train_tokens),
        e.g. to score a run on another corpus's held-out documents.
    n_blocks: keep the first n (default: train.eval_batches * train.batch_size, the blocks
        the trainer's `heldout_loss` column uses).
    """
    from lrc_src.assets import packed_data
    from lrc_src.config import load_config
    from lrc_src.teachers import load_tokenizer

    cfg = load_config(config_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    data = packed_data(cfg, tokenizer, list(corpus) if corpus is not None else None)
    n = cfg.train.eval_batches * cfg.train.batch_size if n_blocks is None else n_blocks
    return np.asarray(data.heldout[:n], dtype=np.int64)  # [N, T]


def heldout_documents_in_train_split(
    eval_corpus: list[str], run_corpus: list[str], heldout_frac: float, seed: int
) -> float:
    """Share of `eval_corpus`'s held-out documents that fall in the *training* split of a run on
    `run_corpus` (the document split of lrc_src.packing, same held-out fraction and seed).

    0 by construction for every part of `run_corpus`, since a list spec holds out of each part what
    that part holds out alone (checked here, not assumed); > 0 only where two corpora share
    documents. An upper bound on contamination: a run trains on far fewer tokens than its split."""
    from lrc_src.corpora import load_document_parts
    from lrc_src.packing import split_documents

    held = {d["text"] for d, h in split_documents(load_document_parts(eval_corpus), heldout_frac, seed) if h}
    train = {d["text"] for d, h in split_documents(load_document_parts(run_corpus), heldout_frac, seed) if not h}
    return len(held & train) / max(len(held), 1)


def run_points(run_dir: str | Path) -> list[tuple[int, Path, Path]]:
    """The points of a run's training that were kept, in step order: (step, student folder,
    trainable state file) for every exports/step_N (train.export_at) and the final student with
    checkpoint/trainable.safetensors (saved at the last step)."""
    import json

    run_dir = Path(run_dir)
    points = []
    for d in (run_dir / "exports").glob("step_*"):
        if d.is_dir() and re.fullmatch(r"step_\d+", d.name):
            points.append((int(d.name[5:]), d, d / "projections.safetensors"))
    steps = int(json.loads((run_dir / "run.json").read_text())["steps"])
    if steps not in {s for s, _, _ in points}:
        points.append((steps, run_dir / "student", run_dir / "checkpoint" / "trainable.safetensors"))
    return sorted(points, key=lambda p: p[0])


# ---------------------------------------------------------------- held-out loss


@torch.no_grad()
def heldout_loss(model, blocks: np.ndarray, batch_size: int = 8, accelerator=None) -> float:
    """Mean next-token loss (nats/token) of `model` over blocks [N, T], every block contributing T-1
    predictions; NaN for no blocks. Runs in eval mode and restores the model's mode after.

    The trainer's `heldout_loss` column (and assets.json's teacher_heldout_loss) is this on the first
    train.eval_batches * train.batch_size held-out blocks.
    accelerator: move each batch to its device and run under its autocast (the run's mixed
        precision); None: CPU tensors, no autocast (the model as loaded).
    """
    blocks = np.asarray(blocks, dtype=np.int64)  # [N, T]
    if len(blocks) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[i : i + batch_size])  # [B, T]
        if accelerator is not None:
            ids = ids.to(accelerator.device)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            logits = model(input_ids=ids).logits  # [B, T, V]
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += lm_loss(logits, ids).item() * n
        count += n
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- FFN neurons (Table 5)


def _mlps(model):
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def ffn_neuron_importance(model, blocks: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """Importance of every FFN intermediate neuron: [L, d_mid].

    importance[i, j] = mean over held-out tokens of |act_fn(gate_ij) * up_ij|, the magnitude of
    neuron j's activation in layer i, i.e. of the coefficient with which column j of down_proj
    is added to the residual stream. It is read at the input of down_proj (a forward pre-hook),
    which is exactly act_fn(gate) * up in the Llama/Qwen2 MLP."""
    mlps = _mlps(model)
    acc = torch.zeros(len(mlps), mlps[0].down_proj.in_features)  # [L, d_mid]
    tokens = 0
    hooks = []
    for i, mlp in enumerate(mlps):

        def pre(_m, inp, i=i):
            acc[i] += inp[0].detach().float().abs().reshape(-1, acc.shape[1]).sum(0)  # [d_mid]

        hooks.append(mlp.down_proj.register_forward_pre_hook(pre))
    try:
        for s in range(0, len(blocks), batch_size):
            ids = torch.as_tensor(np.asarray(blocks[s : s + batch_size], dtype=np.int64))  # [B, T]
            model(input_ids=ids)
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return acc / max(tokens, 1)


def top_neurons(importance: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k most important neurons over the whole model (global ranking across layers), as
    (layer, index) pairs, most important first.

    Global, not per layer: the paper masks 50 neurons of the whole model, and a global ranking
    picks the neurons whose activations are largest wherever they are (per-layer top-k would force
    the same count into every layer, including layers whose largest neurons are small)."""
    L, d_mid = importance.shape
    flat = importance.reshape(-1).topk(k).indices  # [k], into L * d_mid
    return [(int(f) // d_mid, int(f) % d_mid) for f in flat]


def random_neurons(num_layers: int, d_mid: int, k: int, seed: int) -> list[tuple[int, int]]:
    """k distinct neurons drawn uniformly from all L * d_mid (seeded; the same set for every model
    of that shape, so teacher and student are masked at the same indices)."""
    flat = np.random.default_rng(seed).choice(num_layers * d_mid, size=k, replace=False)
    return [(int(f) // d_mid, int(f) % d_mid) for f in flat]


@torch.no_grad()
def mask_ffn_neurons(model, neurons: list[tuple[int, int]]):
    """Zero the output of the given FFN neurons, in place: column j of layer i's down_proj is set
    to 0, so act_fn(gate_ij) * up_ij no longer reaches the residual stream (a down_proj bias, if
    any, is not a neuron's output and is kept). Returns the model (savable as a plain HF folder,
    so it can be evaluated with lm-eval)."""
    mlps = _mlps(model)
    for i, j in neurons:
        mlps[i].down_proj.weight[:, j] = 0.0  # weight [d, d_mid]
    return model


def overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Number of neurons (layer, index) in both sets."""
    return len(set(a) & set(b))


# ---------------------------------------------------------------- projections (Table 21)

_UP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.up_proj$")


def up_projections(state: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """P_up of every layer, {layer: [d_T, d_S]}, from a trainable state (checkpoint's
    trainable.safetensors or an export's projections.safetensors; keys `[clone.]layers.{i}.mlp.up_proj`)."""
    out = {int(m.group(1)): v for k, v in state.items() if (m := _UP.search(k))}
    if not out:
        raise ValueError("no layers.{i}.mlp.up_proj in this state (not an LRC run with ffn_projection='all'?)")
    return dict(sorted(out.items()))


def singular_values(P: torch.Tensor) -> torch.Tensor:
    """Singular values of P [d_T, d_S], descending: [min(d_T, d_S)]."""
    return torch.linalg.svdvals(P.double()).float()


def rank_percentiles(sv: torch.Tensor, pcts=(0, 10, 50, 90, 100)) -> dict[int, float]:
    """Singular value at each rank percentile of a descending spectrum [r]: p=0 is the largest,
    p=100 the smallest, p the value at rank index round(p/100 * (r-1)) (the paper's rank_pct)."""
    r = len(sv)
    return {int(p): float(sv[int(round(p / 100 * (r - 1)))]) for p in pcts}


# ---------------------------------------------------------------- Gram matrices (Table 22)


def ffn_gram(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The d_mid x d_mid Gram matrix of an FFN weight, the space teacher and student share.

    gate/up: weight [d_mid, d] -> W W^T (inner products of the neurons' input directions);
    down:    weight [d, d_mid] -> W^T W (inner products of the neurons' output directions).
    d is d_T for the teacher and d_S for the student: the Gram removes it."""
    W = weight.detach().double()
    if kind in ("gate", "up"):
        return (W @ W.T).float()  # [d_mid, d_mid]
    if kind == "down":
        return (W.T @ W).float()  # [d_mid, d_mid]
    raise ValueError(f"kind must be gate, up or down, got {kind!r}")


def gram_mse(a, b, kind: str) -> float:
    """MSE between the FFN Gram matrices (see `ffn_gram`) of two weights of the same kind."""
    return float(F.mse_loss(ffn_gram(a, kind), ffn_gram(b, kind)))


def ffn_gram_mse(reference, other) -> list[dict]:
    """Per layer and FFN weight: MSE between reference's and other's Gram matrices.
    Rows {layer, weight, value}; the models must have the same L and d_mid."""
    rows = []
    for i, (ma, mb) in enumerate(zip(_mlps(reference), _mlps(other), strict=True)):
        for kind in ("gate", "up", "down"):
            wa, wb = getattr(ma, f"{kind}_proj").weight, getattr(mb, f"{kind}_proj").weight
            rows.append({"layer": i, "weight": kind, "value": gram_mse(wa, wb, kind)})
    return rows


def random_like(model, seed: int):
    """A freshly initialised model of model's class and config, eval mode, no gradients (the
    `scratch` baseline's init, `lrc_src.baselines.random_init`)."""
    from lrc_src.baselines import random_init

    return random_init(type(model), model.config, seed).eval().requires_grad_(False)
