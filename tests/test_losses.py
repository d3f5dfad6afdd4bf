"""The loss functions: each plain reference (the definition) against a naive loop written
independently of lrc_src.losses, and each fused / chunked implementation against its reference
(values and gradients, across chunk boundaries, both KL reductions, temperatures, ignored labels)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lrc_src import losses
from lrc_src.losses import (
    _row_logsumexp,
    clone_mse,
    clone_mse_reference,
    head_losses_reference,
    kl_loss,
    kl_loss_reference,
    lm_loss,
)


def naive_kl(s, t, tau, per_token):
    B, T, V = s.shape
    total = 0.0
    for b in range(B):
        for i in range(T):
            ps = [math.exp(x / tau) for x in s[b, i].tolist()]
            pt = [math.exp(x / tau) for x in t[b, i].tolist()]
            zs, zt = sum(ps), sum(pt)
            total += sum((q / zt) * math.log((q / zt) / (p / zs)) for p, q in zip(ps, pt))
    return total / (B * T if per_token else B)


@pytest.mark.parametrize("tau", [1.0, 40.0])
@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
def test_kl_matches_naive(tau, reduction):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g) * 5, torch.randn(2, 3, 7, generator=g) * 5
    ref = naive_kl(s.double(), t.double(), tau, reduction == "token_mean")
    assert kl_loss(s, t, tau, reduction).item() == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert kl_loss_reference(s, t, tau, reduction).item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


def test_kl_batchmean_scales_with_sequence_length():
    s, t = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    s2, t2 = s.repeat(1, 2, 1), t.repeat(1, 2, 1)
    assert kl_loss(s2, t2, 1.0, "batchmean").item() == pytest.approx(
        2 * kl_loss(s, t, 1.0, "batchmean").item(), rel=1e-5
    )
    assert kl_loss(s2, t2, 1.0, "token_mean").item() == pytest.approx(kl_loss(s, t, 1.0, "token_mean").item(), rel=1e-5)


def test_kl_bad_reduction():
    with pytest.raises(ValueError, match="kl_reduction='sum'"):
        kl_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), 1.0, "sum")


def test_lm_matches_naive_and_ignores_masked():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3] = -100
    terms = []
    for b in range(2):
        for i in range(4):
            y = labels[b, i + 1].item()
            if y == -100:
                continue
            row = logits[b, i].tolist()
            terms.append(math.log(sum(math.exp(x) for x in row)) - row[y])
    assert lm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_head_losses_reference_matches_naive(with_teacher):
    """head_losses_reference on hidden states = the naive KL and next-token CE of their logits."""
    g = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(2, 4, 6, generator=g), torch.randn(7, 6, generator=g), torch.randn(7, generator=g)
    ht, wt = torch.randn(2, 4, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[1, 2] = -100
    z, zt = F.linear(h, w, b).double(), F.linear(ht, wt).double()
    terms = [
        torch.logsumexp(z[i, t], -1).item() - z[i, t, labels[i, t + 1]].item()
        for i in range(2)
        for t in range(3)
        if labels[i, t + 1] != -100
    ]
    kl = naive_kl(z, zt, 3.0, True) if with_teacher else 0.0
    loss, parts = head_losses_reference(
        h,
        w,
        labels,
        (ht, wt, None) if with_teacher else None,
        bias=b,
        temperature=3.0,
        reduction="token_mean",
        kl_weight=0.5,
        lm_weight=2.0,
    )
    assert parts["lm"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * kl + 2.0 * sum(terms) / len(terms), rel=1e-5)


def test_clone_mse_matches_naive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ref = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    ms = sum(y * y for y in b.flatten().tolist()) / b.numel()
    for fn in (clone_mse, clone_mse_reference):
        assert fn(a, b).item() == pytest.approx(ref, rel=1e-6)
        assert fn(a, b, relative=True).item() == pytest.approx(ref / ms, rel=1e-6)


@pytest.mark.parametrize("shapes", [((2, 3, 4), (1, 3, 4)), ((2, 3, 4), (2, 3, 5)), ((6,), (2, 3))])
def test_clone_mse_rejects_mismatched_shapes(shapes):
    """A target that broadcasts against the student ([1, T, D] vs [B, T, D]) would otherwise be
    accepted, with its gradient summed over the copies; every mismatch is a ValueError naming both."""
    a, b = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    with pytest.raises(ValueError, match=r"student shape .* != target shape"):
        clone_mse(a, b)
    with pytest.raises(ValueError, match=r"student shape .* != target shape"):
        clone_mse(b, a, relative=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
def test_kl_gradient_matches_autograd_reference(dtype, reduction, monkeypatch):
    """The chunked KL's value and student gradient equal autograd through F.kl_div, across
    several chunks (chunk size forced small) and in the student's dtype."""
    from lrc_src import losses

    monkeypatch.setitem(losses.KL_CHUNK_ELEMENTS, "cpu", 3 * 37)  # 3 rows of V=37 per chunk
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 5, 37, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(2, 5, 37, generator=g) * 3).to(dtype)
    tau = 2.0
    value = kl_loss(s, t, tau, reduction)
    (value * 1.7).backward()
    s_ref = s.detach().float().requires_grad_()
    ref = kl_loss_reference(s_ref, t, tau, reduction)
    (ref * 1.7).backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert s.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(s.grad.float(), s_ref.grad, rtol=tol, atol=tol * 1e-2), (
        (s.grad.float() - s_ref.grad).abs().max()
    )


def _head_reference(h, w, b, labels, ht, wt, bt, tau, reduction, kl_weight, lm_weight):
    """kl_weight * F.kl_div + lm_weight * F.cross_entropy on whole fp32 logits (autograd)."""
    teacher = None if ht is None else (ht, wt, bt)
    return head_losses_reference(
        h, w, labels, teacher, bias=b, temperature=tau, reduction=reduction, kl_weight=kl_weight, lm_weight=lm_weight
    )[0]


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_head_losses_match_autograd_reference(tau, reduction, with_teacher, with_bias, monkeypatch):
    """The fused head + KL + LM: value, parts and gradients (hidden, weight, bias) equal autograd
    through whole logits, over several chunks, with ignored labels and weighted terms."""
    from lrc_src import losses

    V = 37
    monkeypatch.setitem(losses.HEAD_CHUNK_ELEMENTS, "cpu", 4 * V)  # 4 rows per chunk: 5 chunks for 18 rows
    monkeypatch.setitem(losses.HEAD_SUBCHUNK_ELEMENTS, "cpu", 3 * V)  # sub-chunks of 3 + 1 rows per chunk
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g).requires_grad_()
    w = torch.randn(V, 16, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[0, 3] = labels[1, 8] = -100
    ht, wt = torch.randn(2, 9, 24, generator=g), torch.randn(V, 24, generator=g)
    bt = torch.randn(V, generator=g) if with_bias else None
    teacher = (ht, wt, bt) if with_teacher else None
    loss, parts = losses.head_losses(
        h, w, labels, teacher, bias=b, temperature=tau, reduction=reduction, kl_weight=0.7, lm_weight=1.3
    )
    (loss * 2.5).backward()
    grads = [h.grad, w.grad] + ([b.grad] if with_bias else [])
    for x in [h, w] + ([b] if with_bias else []):
        x.grad = None
    ref = _head_reference(h, w, b, labels, *(teacher or (None, None, None)), tau, reduction, 0.7, 1.3)
    (ref * 2.5).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    z = F.linear(h, w, b).detach()
    assert parts["lm"].item() == pytest.approx(lm_loss(z, labels).item(), rel=1e-5)
    if with_teacher:
        assert parts["kl"].item() == pytest.approx(kl_loss(z, F.linear(ht, wt, bt), tau, reduction).item(), rel=1e-5)
    else:
        assert parts["kl"].item() == 0.0
    assert not parts["kl"].requires_grad and not parts["lm"].requires_grad
    for got, x in zip(grads, [h, w] + ([b] if with_bias else [])):
        assert torch.allclose(got, x.grad, rtol=1e-5, atol=1e-6), (got - x.grad).abs().max()


@pytest.mark.parametrize("tau", [1.0, 40.0])
def test_head_losses_gradient_does_not_depend_on_the_chunking(tau, monkeypatch):
    """Every row's softmaxes and gradient are computed independently, so the chunk and sub-chunk
    sizes change only the order in which the loss sums accumulate: gradients bit for bit equal
    under bf16 autocast, losses to float rounding."""
    from lrc_src import losses

    V = 53
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 7, 16, generator=g).requires_grad_()
    w = (torch.randn(V, 16, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (3, 7), generator=g)
    teacher = (torch.randn(3, 7, 24, generator=g), torch.randn(V, 24, generator=g) * 0.5, None)
    results = []
    for rows, sub_rows in ((21, 21), (8, 3), (5, 1)):
        monkeypatch.setitem(losses.HEAD_CHUNK_ELEMENTS, "cpu", rows * V)
        monkeypatch.setitem(losses.HEAD_SUBCHUNK_ELEMENTS, "cpu", sub_rows * V)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, parts = losses.head_losses(h, w, labels, teacher, temperature=tau)
        loss.backward()
        results.append((loss.detach(), parts["kl"], h.grad, w.grad))
        h.grad = w.grad = None
    for loss, kl, gh, gw in results[1:]:
        assert torch.equal(gh, results[0][2]) and torch.equal(gw, results[0][3])
        assert loss.item() == pytest.approx(results[0][0].item(), rel=1e-6)
        assert kl.item() == pytest.approx(results[0][1].item(), rel=1e-6)


def test_head_losses_under_bf16_autocast_and_no_grad():
    """Under bf16 autocast the logits are formed in bf16 (as F.linear would), the softmaxes in fp32;
    gradients come back in the inputs' dtypes. Without grad no buffer is kept."""
    from lrc_src import losses

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 16, generator=g).requires_grad_()
    w = (torch.randn(29, 16, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, 29, (2, 6), generator=g)
    ht, wt = torch.randn(2, 6, 8, generator=g), torch.randn(29, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = losses.head_losses(h, w, labels, (ht, wt, None), temperature=2.0)
        z, zt = F.linear(h, w), F.linear(ht, wt)  # bf16
        ref_kl, ref_lm = kl_loss(z, zt, 2.0), lm_loss(z, labels)
    assert parts["kl"].item() == pytest.approx(ref_kl.item(), rel=1e-4)
    assert parts["lm"].item() == pytest.approx(ref_lm.item(), rel=1e-4)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (ref_kl + ref_lm).backward()
    assert torch.allclose(gh, h.grad, rtol=2e-2, atol=1e-3) and torch.allclose(gw, w.grad, rtol=2e-2, atol=1e-3)
    wanted = []  # per piece: was a gradient buffer handed over?

    def spy(*args):
        wanted.append(args[-1] is not None)
        return losses.head_chunk_losses(*args)

    with torch.no_grad():
        loss2, _ = losses.head_losses(h, w, labels, (ht, wt, None), temperature=2.0, chunk_losses=spy)
    assert loss2.item() == pytest.approx(
        _head_reference(h, w, None, labels, ht, wt, None, 2.0, "batchmean", 1.0, 1.0).item(), rel=1e-5
    )
    assert wanted and not any(wanted)
    losses.head_losses(h, w, labels, (ht, wt, None), temperature=2.0, chunk_losses=spy)
    assert wanted[-1]  # with grad, the same call fills one


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]
)
@pytest.mark.parametrize("tau, with_teacher", [(40.0, True), (1.0, False)])
def test_compiled_head_chunk_losses_match_eager(tau, with_teacher, device, monkeypatch):
    """The head's per-piece work through torch.compile (`compiled_head_chunk_losses`, what the
    methods run on CUDA) gives the eager loss, parts and gradients, under bf16 autocast, with
    ignored labels (the number of targets reaches the compiled copy as a tensor)."""
    V = 41
    monkeypatch.setitem(losses.HEAD_CHUNK_ELEMENTS, device, 6 * V)  # 3 chunks of 6 rows for 18 rows
    monkeypatch.setitem(losses.HEAD_SUBCHUNK_ELEMENTS, device, 3 * V)  # 2 pieces of 3 rows each
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 9, 16, generator=g).to(device).requires_grad_()
    w = (torch.randn(V, 16, generator=g) * 0.5).to(device).requires_grad_()
    labels = torch.randint(0, V, (2, 9), generator=g).to(device)
    labels[1, 2:5] = -100
    teacher = (torch.randn(2, 9, 24, generator=g).to(device), (torch.randn(V, 24, generator=g) * 0.5).to(device), None)
    compiled = losses.compiled_head_chunk_losses()

    def run(chunk_losses, lm_weight):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, parts = losses.head_losses(
                h,
                w,
                labels,
                teacher if with_teacher else None,
                temperature=tau,
                lm_weight=lm_weight,
                chunk_losses=chunk_losses,
            )
        loss.backward()
        out = (loss.detach(), parts["kl"], parts["lm"], h.grad, w.grad)
        h.grad = w.grad = None
        return out

    (loss, kl, lm, gh, gw), (c_loss, c_kl, c_lm, c_gh, c_gw) = run(None, 1.0), run(compiled, 1.0)
    assert c_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert c_kl.item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6) and c_lm.item() == pytest.approx(
        lm.item(), rel=1e-5
    )
    for got, want in ((c_gh, gh), (c_gw, gw)):  # both from bf16 gradients of the logits
        assert (got - want).norm() <= 1e-2 * want.norm(), (got - want).abs().max()
    if with_teacher:  # at tau 40 the KL's gradient is under 1% of the whole: checked on its own
        kl_only, c_kl_only = run(None, 0.0), run(compiled, 0.0)
        for got, want in zip(c_kl_only[3:], kl_only[3:]):
            assert want.norm() > 0 and (got - want).norm() <= 1e-2 * want.norm(), (got - want).abs().max()


def test_head_losses_bad_input():
    h, w = torch.zeros(1, 3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="labels shape"):
        from lrc_src.losses import head_losses

        head_losses(h, w, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="kl_reduction"):
        head_losses(h, w, torch.zeros(1, 3, dtype=torch.long), reduction="sum")


@pytest.mark.parametrize("relative", [False, True])
def test_clone_mse_bf16_value_and_gradients(relative):
    """bf16 inputs (autocast): value within 1e-3 of the fp32 reference, gradients (student and a
    target that requires grad) within bf16 rounding, in the inputs' dtypes."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 7, 33, generator=g).bfloat16().requires_grad_()
    t = (s.detach().float() + 0.1 * torch.randn(4, 7, 33, generator=g)).bfloat16().requires_grad_()
    value = clone_mse(s, t, relative)
    (value * 3.0).backward()
    s32, t32 = s.detach().float().requires_grad_(), t.detach().float().requires_grad_()
    ref = clone_mse_reference(s32, t32, relative)
    (ref * 3.0).backward()
    assert value.dtype == torch.float32 and value.item() == pytest.approx(ref.item(), rel=1e-3)
    assert s.grad.dtype == t.grad.dtype == torch.bfloat16
    assert torch.allclose(s.grad.float(), s32.grad, rtol=1e-2, atol=1e-6)
    assert torch.allclose(t.grad.float(), t32.grad, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("scale", [0.01, 1.0, 40.0])
def test_row_logsumexp_from_max_equals_the_argmax_gather_bit_for_bit(scale):
    """The fused head takes each row's log-partition as max(x) - log max(softmax(x)). That is the
    value at the argmax k (x_k - log p_k, the previous formula) bit for bit, ties included, and
    logsumexp(x) to fp32 rounding. Rows of 1001 (a vector tail) and 49152 logits."""
    g = torch.Generator().manual_seed(5)
    for V in (1001, 49152):
        x = torch.randn(64, V, generator=g) * scale
        x[0, 7] = x[0, 900] = x[0].max() + 1.0  # a tie for the maximum
        x[1] = 0.0  # a constant row: every entry ties
        p = torch.softmax(x, dim=-1)
        k = x.argmax(dim=-1, keepdim=True)
        got = _row_logsumexp(x.amax(dim=-1, keepdim=True), p)
        assert torch.equal(got, x.gather(1, k) - p.gather(1, k).log())
        torch.testing.assert_close(got.squeeze(1), torch.logsumexp(x.double(), dim=-1).float(), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- implementations vs their references
def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 5, 37), (3, 7, 53)])
@pytest.mark.parametrize("chunk_rows", [1, 3, 5, 1 << 20])  # a row per chunk, chunks (not) dividing N, one chunk
@pytest.mark.parametrize("reduction", ["batchmean", "token_mean"])
@pytest.mark.parametrize("tau", [1.0, 2.5, 40.0])
def test_kl_loss_matches_reference(shape, chunk_rows, reduction, tau, monkeypatch):
    """`kl_loss` (chunked `_SoftKLSum`) = `kl_loss_reference`: value and student gradient, for any
    chunking; the teacher gets no gradient from either."""
    monkeypatch.setitem(losses.KL_CHUNK_ELEMENTS, "cpu", chunk_rows * shape[-1])
    g = torch.Generator().manual_seed(sum(shape))
    s = (torch.randn(*shape, generator=g) * 3).requires_grad_()
    t = (torch.randn(*shape, generator=g) * 3).requires_grad_()
    got = kl_loss(s, t, tau, reduction)
    ref = kl_loss_reference(s, t, tau, reduction)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    (gs,) = _grads(got * 1.3, s)
    (rs,) = _grads(ref * 1.3, s)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError):  # the teacher logits are detached in both
        torch.autograd.grad(kl_loss(s, t, tau, reduction), t)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(kl_loss_reference(s, t, tau, reduction), t)


@pytest.mark.parametrize("B,T", [(1, 2), (2, 9), (3, 7)])
@pytest.mark.parametrize("rows,sub_rows", [(1, 1), (4, 3), (5, 5), (6, 2), (1 << 20, 1 << 20)])
@pytest.mark.parametrize(
    "tau,reduction", [(1.0, "batchmean"), (2.5, "token_mean"), (40.0, "batchmean"), (40.0, "token_mean")]
)
def test_head_losses_match_reference_across_chunkings(B, T, rows, sub_rows, tau, reduction, monkeypatch):
    """`head_losses` (`_FusedHeadLosses`) = `head_losses_reference`: loss, both parts and the
    gradients to hidden, weight and bias, whatever the chunk and sub-chunk sizes (one row each,
    sizes that do and do not divide B*T, one chunk), with ignored labels (a whole row of them
    where B > 1)."""
    V = 31
    monkeypatch.setitem(losses.HEAD_CHUNK_ELEMENTS, "cpu", rows * V)
    monkeypatch.setitem(losses.HEAD_SUBCHUNK_ELEMENTS, "cpu", sub_rows * V)
    g = torch.Generator().manual_seed(B * 100 + T)
    h = torch.randn(B, T, 12, generator=g).requires_grad_()
    w = torch.randn(V, 12, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -1] = -100
    if B > 1:
        labels[1] = -100
    teacher = (torch.randn(B, T, 20, generator=g), torch.randn(V, 20, generator=g), torch.randn(V, generator=g))
    kw = dict(bias=b, temperature=tau, reduction=reduction, kl_weight=0.7, lm_weight=1.3)
    loss, parts = losses.head_losses(h, w, labels, teacher, **kw)
    ref, ref_parts = head_losses_reference(h, w, labels, teacher, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for k in ("kl", "lm"):
        assert parts[k].item() == pytest.approx(ref_parts[k].item(), rel=1e-5, abs=1e-6), k
    for got, want in zip(_grads(loss * 2.5, h, w, b), _grads(ref * 2.5, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_head_losses_other_ignore_index_and_no_targets(with_teacher):
    """ignore_index other than -100, and a batch without any target left (LM term 0, not nan): the
    fused head and its reference agree on value and gradients."""
    V = 13
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 8, generator=g).requires_grad_()
    w = torch.randn(V, 8, generator=g).requires_grad_()
    teacher = (torch.randn(2, 5, 6, generator=g), torch.randn(V, 6, generator=g), None) if with_teacher else None
    partly = torch.randint(0, V, (2, 5), generator=g)
    partly[0, 1:3] = -1
    for labels in (partly, torch.full((2, 5), -1)):
        kw = dict(temperature=2.0, reduction="token_mean", ignore_index=-1)
        loss, parts = losses.head_losses(h, w, labels, teacher, **kw)
        ref, ref_parts = head_losses_reference(h, w, labels, teacher, **kw)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
        assert parts["lm"].item() == pytest.approx(ref_parts["lm"].item(), rel=1e-5, abs=1e-7)
        if (labels == -1).all():
            assert parts["lm"].item() == 0.0
        for got, want in zip(_grads(loss, h, w), _grads(ref, h, w)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (3, 7, 33)])
@pytest.mark.parametrize("relative", [False, True])
def test_clone_mse_matches_reference(shape, relative):
    """`clone_mse` (`_MeanSquaredError`) = `clone_mse_reference` in fp32: value and gradients to the
    student and to a target that requires grad (the projected teacher outputs)."""
    g = torch.Generator().manual_seed(len(shape))
    s = torch.randn(*shape, generator=g).requires_grad_()
    t = (torch.randn(*shape, generator=g) * 2).requires_grad_()
    got, ref = clone_mse(s, t, relative), clone_mse_reference(s, t, relative)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(_grads(got * 0.9, s, t), _grads(ref * 0.9, s, t)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
