"""Teacher-derived starts of LowRankClone's projections (LRCConfig.init other than "normal").

    prune         every P = S, the one-hot selection [d_T, d_S] of the d_S most important hidden
                  channels; student norms = the teacher's at those channels (the export is exactly
                  the hard-pruned teacher)
    prune_scaled  the same, each student norm weight times c = sqrt(f * d_T / d_S), f the share of
                  that norm's input energy in the kept channels
    pca           SliceGPT-style rotation U [d_T, d_S] (top eigenvectors of the second moment of
                  the unit-normalised residual stream): P_emb = P_o = P_down = U, each input-side
                  P = c * diag(gamma) @ U with the preceding norm's gamma, student norms 1

All of them read the teacher's RMSNorms on calibration ids (`teacher_norm_statistics`). The entry
point is `init_from_teacher(clone, calibration_ids)` (also `LowRankClone.init_from_teacher`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from lrc_src.clone import LowRankClone


@torch.no_grad()
def init_from_teacher(clone: LowRankClone, calibration_ids: torch.Tensor) -> torch.Tensor | None:
    """Apply clone.config.init ("prune", "prune_scaled" or "pca"; "normal" is a no-op returning
    None) from teacher statistics on calibration_ids [B, T]. Returns the kept channels [d_S]
    (prune*) or the basis U [d_T, d_S] (pca)."""
    init = clone.config.init
    if init == "normal":
        return None
    if init == "pca":
        return pca(clone, calibration_ids)
    return prune(clone, calibration_ids, scaled=init == "prune_scaled")


@torch.no_grad()
def prune(clone: LowRankClone, calibration_ids: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    """Hard-pruned start: P = one-hot selection of the d_S most important hidden channels.

    Importance of channel c = mean over tokens and over every RMSNorm output of the teacher
    (input/post-attention norms of each layer and the final norm) of |out[..., c]|
    (Minitron-style activation magnitude). Student norm weights = teacher norm weights at the
    kept channels, so `export_student()` is exactly the hard-pruned teacher; with scaled=True
    each is multiplied by its norm's c = sqrt(f * d_T / d_S) (see LRCConfig.init).
    calibration_ids: [B, T]. Returns the kept channel indices, sorted, [d_S].
    """
    d_T, d_S = clone.d_T, clone.d_S
    stats = teacher_norm_statistics(clone.teacher, calibration_ids.to(clone.norm.device), second_moment=scaled)
    importance = torch.stack([s["abs_out"] for s in stats.values()]).mean(0)  # [d_T]
    keep = importance.topk(d_S).indices.sort().values
    S = torch.zeros(d_T, d_S, device=clone.norm.device)
    S[keep, torch.arange(d_S)] = 1.0  # [d_T, d_S] one-hot columns

    def scale(name: str) -> float:
        return energy_scale(stats[name]["second_moment"], S) if scaled else 1.0

    set_projections(clone, out_side=S, in_side=lambda norm: S)
    tm = clone.teacher.model
    clone.norm.copy_(tm.norm.weight[keep] * scale("norm"))
    for i, (layer, tl) in enumerate(zip(clone.layers, tm.layers)):
        for n in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, n).copy_(getattr(tl, n).weight[keep] * scale(f"layers.{i}.{n}"))
    return keep


@torch.no_grad()
def pca(clone: LowRankClone, calibration_ids: torch.Tensor) -> torch.Tensor:
    """SliceGPT-style start (see LRCConfig.init): returns the basis U [d_T, d_S].

    Exact when the residual stream lies in a d_S-dim subspace and the student head is untied; a
    tied head cannot absorb the final norm's gamma in a rotated basis, so the final student norm
    gets the least-squares diagonal c * diag(U^T diag(gamma) U).
    """
    d_S = clone.d_S
    stats = teacher_norm_statistics(clone.teacher, calibration_ids.to(clone.norm.device))
    C = torch.stack([s["second_moment"] for s in stats.values()]).sum(0)  # [d_T, d_T]
    _, evecs = torch.linalg.eigh(C.double())  # ascending
    U = evecs[:, -d_S:].flip(-1)  # [d_T, d_S], largest first
    U = U * torch.sign(U[U.abs().argmax(0), torch.arange(d_S)])  # deterministic signs
    U = U.to(clone.norm.dtype)
    tm = clone.teacher.model

    def in_side(norm: str) -> torch.Tensor:  # c * diag(gamma) @ U: [d_T, d_S]
        gamma = clone.teacher.get_submodule(f"model.{norm}").weight.float()
        return energy_scale(stats[norm]["second_moment"], U) * gamma[:, None] * U

    set_projections(clone, out_side=U, in_side=in_side)
    for layer in clone.layers:
        layer.input_layernorm.fill_(1.0)
        layer.post_attention_layernorm.fill_(1.0)
    if clone.student_tied:  # least-squares diagonal for gamma_final in the rotated basis
        c = energy_scale(stats["norm"]["second_moment"], U)
        clone.norm.copy_(c * (tm.norm.weight.float()[:, None] * U * U).sum(0))
    else:  # P_lm = in_side("norm") absorbs gamma_final (set by set_projections)
        clone.norm.fill_(1.0)
    return U


def set_projections(clone: LowRankClone, out_side: torch.Tensor, in_side: Callable[[str], torch.Tensor]) -> None:
    """P_emb, P_o, P_down (and extra alignment, transposed) = out_side [d_T, d_S]; each
    input-side P = in_side(<name of the RMSNorm that feeds it>); P_lm = in_side("norm")."""
    clone.embed_tokens.copy_(out_side)
    if clone.lm_head is not None:
        clone.lm_head.copy_(in_side("norm"))
    for i, layer in enumerate(clone.layers):
        for block, norm in ((layer.self_attn, "input_layernorm"), (layer.mlp, "post_attention_layernorm")):
            for name, p in block.named_parameters():
                if name in ("o_proj", "down_proj"):
                    p.copy_(out_side)
                elif name in ("o_align", "down_align"):
                    p.copy_(out_side.T)  # [d_S, d_T]: maps the student output back
                else:  # q/k/v/gate/up/in_proj
                    p.copy_(in_side(f"layers.{i}.{norm}"))


def energy_scale(second_moment: torch.Tensor, P: torch.Tensor) -> float:
    """c = sqrt(f * d_T / d_S) for P [d_T, d_S], f = E||x_hat P||^2 = tr(P^T M P) with
    M = E[x_hat^T x_hat] the second moment [d_T, d_T] of the unit-norm input x_hat."""
    d_T, d_S = P.shape
    f = torch.einsum("ij,ik,kj->", P.double(), second_moment.double(), P.double()).item()
    return math.sqrt(max(f, 1e-12) * d_T / d_S)


@torch.no_grad()
def teacher_norm_statistics(
    teacher: PreTrainedModel, input_ids: torch.Tensor, second_moment: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """One teacher forward on input_ids [B, T]; per RMSNorm (keys "norm",
    "layers.{i}.input_layernorm", "layers.{i}.post_attention_layernorm"):
      abs_out:       mean |output| per channel [d_T]
      second_moment: E[x_hat^T x_hat] of the unit-norm input x_hat = x / ||x|| [d_T, d_T]
                     (only when second_moment=True: an N x d_T x d_T product per norm)
    """
    tm, d_T = teacher.model, teacher.config.hidden_size
    names = ["norm"] + [
        f"layers.{i}.{n}" for i in range(len(tm.layers)) for n in ("input_layernorm", "post_attention_layernorm")
    ]
    stats = {}

    def hook(name):
        def fn(_m, inp, out):
            stats[name] = {"abs_out": out.detach().float().abs().reshape(-1, d_T).mean(0)}
            if second_moment:
                x = inp[0].detach().float().reshape(-1, d_T)  # [N, d_T]
                xh = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                stats[name]["second_moment"] = xh.T @ xh / x.shape[0]  # [d_T, d_T]

        return fn

    handles = [tm.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        teacher(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    assert set(stats) == set(names), sorted(set(names) - set(stats))
    return stats
