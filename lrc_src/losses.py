"""The loss terms of Low-Rank Clone, as small functions.

    L = L_KL + L_LM + alpha * L_clone                                   (paper, Eq. 9)

Each function takes plain tensors and returns a scalar tensor; shapes are in the docstrings.
`tests/test_losses.py` checks each against a naive loop written independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_REDUCTIONS = ("batchmean", "token_mean")


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 40.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Forward KL(p_T || p_S) of temperature-softened distributions, no tau^2 factor.

    student_logits, teacher_logits: [B, T, V]. Returns a scalar.

    reduction:
      "batchmean"  (the authors' code: torch kl_div 'batchmean') = sum over positions and
                   vocabulary, divided by the batch size B. It grows linearly with the sequence
                   length T, so its weight relative to the (mean-reduced) LM and clone terms
                   depends on T.
      "token_mean" = the same sum divided by B*T: a per-token KL, independent of T.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction={reduction!r} is not one of {KL_REDUCTIONS}")
    if temperature <= 0:
        raise ValueError(f"kl_temperature={temperature} must be > 0")
    B, T, V = student_logits.shape
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, T, V]
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [B, T, V]
    kl_sum = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)  # sum p_t (log p_t - log p_s)
    return kl_sum / (B if reduction == "batchmean" else B * T)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; mean over non-ignored targets.

    logits: [B, T, V]; labels: [B, T] (ids, or ignore_index for masked positions).
    """
    V = logits.shape[-1]
    shift_logits = logits[:, :-1, :].reshape(-1, V).float()  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def clone_mse(student: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """E(h_S, h_T): mean-squared error over all elements (the paper's E in Eq. 7-8).

    student, target: same shape, e.g. [B, T, D]. With relative=True the MSE is divided by the
    mean square of the (detached) target, so every term starts on the same scale (a small-budget
    option; the paper uses the plain MSE).
    """
    mse = (student.float() - target.float()).pow(2).mean()
    if relative:
        mse = mse / target.detach().float().pow(2).mean().clamp_min(1e-12)
    return mse
