"""The loss terms of Low-Rank Clone, as small functions.

    L = L_KL + L_LM + alpha * L_clone                                   (paper, Eq. 9)

Each function takes plain tensors and returns a scalar tensor; shapes are in the docstrings.
The fused or chunked implementations (`kl_loss`, `head_losses`, `clone_mse`) each have beside
them their plain reference (`kl_loss_reference`, `head_losses_reference`, `clone_mse_reference`,
written with F.kl_div, F.cross_entropy and F.mse_loss on whole tensors in fp32): that is the
definition. `tests/test_losses.py` checks each implementation against its reference (values and
gradients) and the references against naive loops written independently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lrc_src.config import KL_REDUCTIONS


def _check_kl_arguments(temperature: float, reduction: str) -> None:
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction={reduction!r} is not one of {KL_REDUCTIONS}")
    if temperature <= 0:
        raise ValueError(f"kl_temperature={temperature} must be > 0")


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
    _check_kl_arguments(temperature, reduction)
    B, T, _ = student_logits.shape
    kl_sum = _SoftKLSum.apply(student_logits, teacher_logits.detach(), float(temperature))
    return kl_sum / (B if reduction == "batchmean" else B * T)


def kl_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 40.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The definition `kl_loss` implements: F.kl_div on whole fp32 log-softmaxes, summed over
    positions and vocabulary, / B ("batchmean") or / B*T ("token_mean"); no gradient to the teacher."""
    _check_kl_arguments(temperature, reduction)
    B, T, _ = student_logits.shape
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, T, V]
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [B, T, V]
    kl_sum = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
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


def head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 40.0,
    reduction: str = "batchmean",
    kl_weight: float = 1.0,
    lm_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_losses: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LM head, the KL and the LM loss in one pass over chunks of positions.

    hidden: [B, T, d] the student's final-norm output; weight: [V, d] its LM head (bias: [V]);
    labels: [B, T] as for `lm_loss`; teacher: (hidden_t [B, T, d_T], weight_t [V, d_T], bias_t)
    for the KL term, or None (no KL). Returns (loss, {"kl", "lm"}) where
        loss = kl_weight * kl_loss(logits, teacher_logits, temperature, reduction)
             + lm_weight * lm_loss(logits, labels)
    carries the gradient (to hidden, weight and bias; the teacher gets none) and "kl" / "lm" are
    the detached values of the two terms (kl is 0 without a teacher).

    The same value as `kl_loss` and `lm_loss` on the full logits (tested), but neither the
    student's nor the teacher's logits exist at [B, T, V] in fp32: each chunk of rows forms its
    logits in the matmul dtype (autocast's, else the inputs'); each sub-chunk of those rows takes
    the softmaxes in fp32, adds its share of both losses and writes the gradient w.r.t. its logits,
        lm_weight (p_S - onehot) / n_targets + kl_weight (p_S^tau - p_T^tau) / (tau * den),
    into one [B*T, V] buffer in the matmul dtype (only when a gradient is needed). Backward is two
    matmuls with that buffer (d hidden = G W, d weight = G^T hidden). One softmax per distribution
    (three exp passes per logit at tau != 1, two at tau = 1) gives both the probabilities and,
    through its largest value, the log-partition.

    chunk_losses: the per-piece fp32 work, `head_chunk_losses` (default) or its compiled copy
    (`compiled_head_chunk_losses()`, which a method's `compile_layers` picks on CUDA).
    """
    _check_kl_arguments(temperature, reduction)
    B, T, _ = hidden.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be {(B, T)}")
    targets = torch.full_like(labels, ignore_index)  # [B, T]: position t predicts labels[t+1]
    targets[:, :-1] = labels[:, 1:]
    t_hidden, t_weight, t_bias = teacher if teacher is not None else (None, None, None)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    loss, kl, lm = _FusedHeadLosses.apply(
        hidden,
        weight,
        bias,
        targets.reshape(-1),
        t_hidden,
        t_weight,
        t_bias,
        dtype,
        float(temperature),
        B if reduction == "batchmean" else B * T,
        float(kl_weight),
        float(lm_weight),
        ignore_index,
        chunk_losses or head_chunk_losses,
        # a Function's forward runs without grad mode and sees requires_grad only: ask here
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    return loss, {"kl": kl, "lm": lm}


def head_losses_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 40.0,
    reduction: str = "batchmean",
    kl_weight: float = 1.0,
    lm_weight: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The definition `head_losses` implements, on whole logits (same arguments and outputs):
        logits = F.linear(hidden, weight, bias)   [B, T, V], in autocast's dtype under autocast
        loss   = kl_weight * kl_loss_reference(logits, F.linear(*teacher), temperature, reduction)
               + lm_weight * F.cross_entropy(next-token targets, summed) / max(n_targets, 1)
    The LM term is `lm_loss(logits, labels)` while any target is left and 0 when none is (where
    F.cross_entropy's mean would be nan); kl is 0 without a teacher."""
    _check_kl_arguments(temperature, reduction)
    B, T, _ = hidden.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be {(B, T)}")
    logits = F.linear(hidden, weight, bias)  # [B, T, V]
    V = logits.shape[-1]
    targets = labels[:, 1:].reshape(-1)  # [B*(T-1)]: position t predicts labels[t+1]
    n_targets = int((targets != ignore_index).sum())
    ce_sum = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), targets, ignore_index=ignore_index, reduction="sum")
    lm = ce_sum / max(n_targets, 1)
    if teacher is None:
        kl = torch.zeros((), dtype=torch.float32, device=hidden.device)
    else:
        with torch.no_grad():
            teacher_logits = F.linear(*teacher)  # [B, T, V]
        kl = kl_loss_reference(logits, teacher_logits, temperature, reduction)
    loss = kl_weight * kl + lm_weight * lm
    return loss, {"kl": kl.detach(), "lm": lm.detach()}


# Logit elements per chunk of `head_losses`, two levels (rows = elements // V):
# - HEAD_CHUNK_ELEMENTS: rows per logits matmul. Each matmul streams the whole [V, d] head, so
#   few rows make it weight-bound. CPU: 12M (256 rows at a 49K vocabulary: of 85-1024 rows the
#   fastest student + teacher head matmuls at the tiny shapes, 111 ms per 1024 rows vs 165 ms
#   at 85 rows); GPUs: 64M.
# - HEAD_SUBCHUNK_ELEMENTS: rows per pass of the fp32 softmax / KL / gradient work inside a
#   chunk. CPU: 1M (21 rows, 4 MiB per fp32 buffer), so the five buffers of the KL stay in the L3
#   cache between the ~20 elementwise passes (85-row passes took 1.7-3x as long); elsewhere one
#   pass per chunk. Measurements: docs/LOG.md, "The fused head in cache-sized pieces".
HEAD_CHUNK_ELEMENTS = {"cpu": 3 << 22}
HEAD_CHUNK_ELEMENTS_DEFAULT = 1 << 26
HEAD_SUBCHUNK_ELEMENTS = {"cpu": 1 << 20}


def _row_logsumexp(x_max: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of x [c, V] from x_max = max(x) [c, 1] and p = softmax(x) [c, V]:
    x_max - log max(p) (max(p) = p at the argmax >= 1/V, so no exp pass of its own). Returns [c, 1].

    Two `amax` passes instead of an `argmax` and gathers: on CPU `argmax` over a [c, V] chunk costs
    as much as the whole softmax, `amax` an eighth of it. Bit-identical to gathering at the argmax k:
    x_k is x_max, and p_k is the largest p (exp(x - x_max) <= exp(0) = 1 in every kernel, then one
    common scale)."""
    return x_max - p.amax(dim=-1, keepdim=True).log()


def head_chunk_losses(
    z: torch.Tensor,
    zt: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    coef: torch.Tensor,
    tau: float,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 work of `head_losses` on one piece of rows, after the logits matmuls.

    z: [c, V] student logits and zt: [c, V] teacher logits (None: no KL), in the matmul dtype;
    targets: [c] next-token ids (ignore_index: none); coef: fp32 [3] = (lm_c, kl_c, kl_c / tau),
    d loss / d (sum of CE over rows) and d loss / d (sum of KL over rows), as a tensor so that a
    compiled copy does not recompile when the number of targets changes; grad: [c, V] where
    d loss / d z is written (None: not needed). Returns the piece's KL sum and CE sum (fp32 scalars).

    About 20 elementwise passes over [c, V] in fp32: plain tensor code that torch.compile can fuse
    (`compiled_head_chunk_losses`), tested equal to this eager version.
    """
    lm_c, kl_c, kl_c_tau = coef[0], coef[1], coef[2]
    want_grad = grad is not None
    ok = targets != ignore_index  # [c]
    tgt = torch.where(ok, targets, 0)  # [c]
    z = z.float()  # [c, V]
    m = z.amax(dim=-1, keepdim=True)  # [c, 1]
    z_tgt = z.gather(1, tgt[:, None]).squeeze(1)  # [c]
    ps = torch.softmax(z, dim=-1)  # p_S  [c, V]
    lse = _row_logsumexp(m, ps)  # [c, 1]
    lm_sum = ((lse.squeeze(1) - z_tgt) * ok).sum()
    lm_row = ok[:, None] * lm_c  # [c, 1]: the CE weight of each row (0 = no target)
    if zt is None:
        kl_sum = torch.zeros((), dtype=torch.float32, device=z.device)
        g = ps.mul_(lm_row) if want_grad else None  # lm_c p_S (- onehot below)
    else:
        zt = zt.float().div_(tau)  # [c, V] teacher logits / tau
        pt = torch.softmax(zt, dim=-1)  # p_T
        lse_t = _row_logsumexp(zt.amax(dim=-1, keepdim=True), pt)
        if tau == 1.0:  # p_S^tau = p_S: one softmax serves both terms
            zs, ps_tau, lse_s = z, ps, lse
        else:
            zs = z.div_(tau)  # z / tau in place (z's only other uses are above)
            ps_tau = torch.softmax(zs, dim=-1)  # p_S^tau
            lse_s = _row_logsumexp(m / tau, ps_tau)  # max(z / tau) = max(z) / tau
        # sum p_T (log p_T - log p_S), log p_T - log p_S = (zt - zs) - (lse_t - lse_s)
        kl_sum = torch.dot(pt.view(-1), zt.sub_(zs).sub_(lse_t - lse_s).view(-1))
        if not want_grad:
            g = None
        elif tau == 1.0:  # (lm_c [row has a target] + kl_c) p_S - kl_c p_T
            g = ps.mul_(lm_row + kl_c).sub_(pt.mul_(kl_c))
        else:  # kl_c / tau (p_S^tau - p_T) + lm_c p_S [..]
            g = ps_tau.sub_(pt).mul_(kl_c_tau).add_(ps.mul_(lm_row))
    if want_grad:  # - lm_c onehot(target) on rows with a target (lm_row is 0 elsewhere)
        grad.copy_(g.scatter_add_(1, tgt[:, None], -lm_row))
    return kl_sum, lm_sum


def compiled_head_chunk_losses(**options) -> Callable:
    """`head_chunk_losses` through torch.compile (options over static shapes): its elementwise
    passes fused into a few kernels."""
    return torch.compile(head_chunk_losses, **{"dynamic": False, **options})


def compiles_head(device: torch.device, head: bool | None = None) -> bool:
    """Whether a method's `compile_layers` compiles the head's per-chunk work: `head`, or when it is
    None, on CUDA only. On a GPU each pass over a chunk's [c, V] fp32 buffers is a trip to device
    memory, and LRC's KL takes about 20 of them per micro-batch; on the CPU the sub-chunks already
    keep those buffers in cache, and the compiled copy did not make the head faster (docs/LOG.md)."""
    return device.type == "cuda" if head is None else head


def compiled_head_for(device: torch.device, head: bool | None = None, **options) -> Callable | None:
    """The `chunk_losses` a method's `compile_layers` keeps for `head_losses`: the compiled copy
    where `compiles_head` says so, else None (the eager `head_chunk_losses`)."""
    return compiled_head_chunk_losses(**options) if compiles_head(device, head) else None


class _FusedHeadLosses(torch.autograd.Function):
    """See `head_losses`. Outputs (loss, kl, lm); only loss is differentiable."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        t_hidden,
        t_weight,
        t_bias,
        dtype,
        tau,
        kl_den,
        kl_weight,
        lm_weight,
        ignore_index,
        chunk_losses,
        want_grad,
    ):
        dev = hidden.device
        with torch.autocast(dev.type, enabled=False):
            V = weight.shape[0]
            h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [N, d]
            w = weight.to(dtype)  # [V, d]
            b = None if bias is None else bias.to(dtype)
            if t_hidden is not None:
                ht = t_hidden.reshape(-1, t_hidden.shape[-1]).to(dtype)  # [N, d_T]
                wt, bt = t_weight.to(dtype), None if t_bias is None else t_bias.to(dtype)
            N = h.shape[0]
            valid = targets != ignore_index  # [N]
            n_lm = int(valid.sum())
            G = torch.empty((N, V) if want_grad else (0,), dtype=dtype, device=dev)
            lm_c = lm_weight / max(n_lm, 1)  # d loss / d (sum of CE over rows)
            kl_c = kl_weight / kl_den  # d loss / d (sum of KL over rows)
            kl_sum = torch.zeros((), dtype=torch.float32, device=dev)
            lm_sum = torch.zeros((), dtype=torch.float32, device=dev)
            step = max(1, HEAD_CHUNK_ELEMENTS.get(dev.type, HEAD_CHUNK_ELEMENTS_DEFAULT) // V)  # rows
            sub = HEAD_SUBCHUNK_ELEMENTS.get(dev.type)
            sub = step if sub is None else max(1, sub // V)  # rows
            coef = torch.tensor([lm_c, kl_c, kl_c / tau], dtype=torch.float32, device=dev)
            for i0 in range(0, N, step):
                j0 = min(i0 + step, N)
                zc = F.linear(h[i0:j0], w, b)  # [C, V] student logits, matmul dtype
                ztc = None if t_hidden is None else F.linear(ht[i0:j0], wt, bt)  # [C, V] teacher logits
                for i in range(i0, j0, sub):
                    j = min(i + sub, j0)
                    zt = None if ztc is None else ztc[i - i0 : j - i0]
                    kl_piece, lm_piece = chunk_losses(
                        zc[i - i0 : j - i0], zt, targets[i:j], ignore_index, coef, tau, G[i:j] if want_grad else None
                    )
                    kl_sum += kl_piece
                    lm_sum += lm_piece
            ctx.save_for_backward(h, w, G)
            ctx.has_bias, ctx.dtypes = bias is not None, (hidden.dtype, weight.dtype)
            ctx.shape = hidden.shape
        lm = lm_sum / max(n_lm, 1)
        kl = kl_sum / kl_den
        loss = kl_weight * kl + lm_weight * lm
        ctx.mark_non_differentiable(kl, lm)
        return loss, kl, lm

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_lm):
        h, w, G = ctx.saved_tensors
        dh = dw = db = None
        with torch.autocast(h.device.type, enabled=False):
            go = grad_loss.to(G.dtype)
            if ctx.needs_input_grad[0]:
                dh = (G @ w).mul_(go).to(ctx.dtypes[0]).view(ctx.shape)  # [B, T, d]
            if ctx.needs_input_grad[1]:
                dw = (G.T @ h).mul_(go).to(ctx.dtypes[1])  # [V, d]
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = G.float().sum(0).mul_(grad_loss)
        return dh, dw, db, *([None] * 12)


def clone_mse(student: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """E(h_S, h_T): mean-squared error over all elements (the paper's E in Eq. 7-8).

    student, target: same shape, e.g. [B, T, D]. With relative=True the MSE is divided by the
    mean square of the (detached) target, so every term starts on the same scale (a small-budget
    option; the paper uses the plain MSE).
    """
    if student.shape != target.shape:  # broadcasting would silently sum the gradient over copies
        raise ValueError(f"clone_mse: student shape {tuple(student.shape)} != target shape {tuple(target.shape)}")
    mse = _MeanSquaredError.apply(student, target)
    if relative:  # mean square of the target, accumulated in fp32 without an fp32 copy
        ms = torch.linalg.vector_norm(target.detach(), dtype=torch.float32).square() / target.numel()
        mse = mse / ms.clamp_min(1e-12)
    return mse


def clone_mse_reference(student: torch.Tensor, target: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """The definition `clone_mse` implements: F.mse_loss in fp32 (relative: divided by the mean
    square of the detached target). student, target: the same shape."""
    mse = F.mse_loss(student.float(), target.float())
    if relative:
        mse = mse / target.detach().float().pow(2).mean().clamp_min(1e-12)
    return mse


class _MeanSquaredError(torch.autograd.Function):
    """mean((student - target)^2) for inputs of any float dtype (bf16 under autocast); fp32 scalar.

    The difference is formed once, in the inputs' (promoted) dtype, and kept for backward (instead
    of both inputs); the sum of squares accumulates in fp32 (`vector_norm(..., dtype=float32)`).
    In bf16 the difference of two bf16 numbers is exact when they are close (Sterbenz) and
    otherwise rounded like any bf16 activation gradient, so the gradient 2 (student - target) / n,
    which autocast would hand back in bf16 anyway, loses nothing that matters; the value agrees
    with the fp32 reference to ~1e-4 (tested). Three passes over the data instead of about ten
    with fp32 temporaries. The target may require grad (the projected teacher targets
    o^T_attn P_o, o^T_ffn P_down).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = student - target  # same shape, the promoted dtype
        ctx.save_for_backward(diff)
        ctx.dtypes = (student.dtype, target.dtype)
        return torch.linalg.vector_norm(diff, dtype=torch.float32).square() / diff.numel()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad = diff * (2 * grad_out / diff.numel())  # d mse / d student; a 0-dim fp32 factor keeps diff.dtype
        d_student = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_target = (-grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_student, d_target
