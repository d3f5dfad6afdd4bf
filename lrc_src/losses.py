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

    Computed in fp32 over chunks of rows by `_SoftKLSum` (the value and gradient of
    F.kl_div(log_softmax(s/tau), log_softmax(t/tau), log_target=True, reduction="sum"), without
    its ~10 full-size [B, T, V] fp32 temporaries).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction={reduction!r} is not one of {KL_REDUCTIONS}")
    if temperature <= 0:
        raise ValueError(f"kl_temperature={temperature} must be > 0")
    B, T, V = student_logits.shape
    kl_sum = _SoftKLSum.apply(student_logits, teacher_logits.detach(), float(temperature))
    return kl_sum / (B if reduction == "batchmean" else B * T)


# Elements per chunk of the KL's fp32 temporaries. CPU: 512K (2 MiB), so they stay in reused,
# cache-sized allocations instead of fresh page-faulting [B*T, V] buffers. GPUs: 64M (256 MiB),
# a few large kernels per step and a bounded transient memory.
KL_CHUNK_ELEMENTS = {"cpu": 1 << 19}
KL_CHUNK_ELEMENTS_DEFAULT = 1 << 26


class _SoftKLSum(torch.autograd.Function):
    """sum_{rows, v} p_t (log p_t - log p_s), p = softmax(logits / tau) in fp32; scalar.

    The gradient w.r.t. the student logits, (p_s - p_t) / tau per row (p_t sums to 1), is formed
    chunk by chunk in the forward pass and kept as one fp32 [B*T, V] buffer; backward scales it.
    The teacher logits get no gradient.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
        V = student.shape[-1]
        s2, t2 = student.reshape(-1, V), teacher.reshape(-1, V)  # [N, V]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty(s2.shape if want_grad else (0,), dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        step = max(1, KL_CHUNK_ELEMENTS.get(student.device.type, KL_CHUNK_ELEMENTS_DEFAULT) // V)  # rows
        for i in range(0, s2.shape[0], step):
            log_p_s = F.log_softmax(s2[i : i + step].float() / tau, dim=-1)  # [c, V]
            log_p_t = F.log_softmax(t2[i : i + step].float() / tau, dim=-1)  # [c, V]
            p_t = log_p_t.exp()
            total += (p_t * (log_p_t - log_p_s)).sum()
            if want_grad:  # d sum / d student = (p_s - p_t) / tau
                torch.sub(log_p_s.exp_(), p_t, out=grad[i : i + step]).div_(tau)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        out = torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device)  # the student's dtype
        torch.mul(grad, grad_out, out=out)  # in fp32, rounded once to out's dtype
        return out.view(ctx.shape), None, None


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
    mse = _MeanSquaredError.apply(student, target)
    if relative:
        mse = mse / target.detach().float().pow(2).mean().clamp_min(1e-12)
    return mse


class _MeanSquaredError(torch.autograd.Function):
    """mean((student - target)^2) in fp32, for inputs of any float dtype (bf16 under autocast).

    The same value and gradient (bit for bit) as (student.float() - target.float()).pow(2).mean(),
    with one fp32 temporary instead of four; it keeps the inputs themselves for backward (not an
    fp32 difference) and recomputes the difference there. The target may require grad (the
    projected teacher targets o^T P_o, f^T P_down).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(student, target)
        diff = student.to(torch.float32, copy=True).sub_(target)  # same shape, fp32
        return diff.pow_(2).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, target = ctx.saved_tensors
        diff = student.to(torch.float32, copy=True).sub_(target)
        grad = diff.mul_(2 * (grad_out / diff.numel()))  # d mse / d student, fp32
        d_student = grad.to(student.dtype) if ctx.needs_input_grad[0] else None
        d_target = (-grad).to(target.dtype) if ctx.needs_input_grad[1] else None
        return d_student, d_target
