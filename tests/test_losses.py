"""Each loss function against a naive loop written independently of lrc_src.losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from lrc_src.losses import _row_logsumexp, clone_mse, kl_loss, lm_loss


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


def test_kl_batchmean_scales_with_sequence_length():
    s, t = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    s2, t2 = s.repeat(1, 2, 1), t.repeat(1, 2, 1)
    assert kl_loss(s2, t2, 1.0, "batchmean").item() == pytest.approx(2 * kl_loss(s, t, 1.0, "batchmean").item(), rel=1e-5)
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


def test_clone_mse_matches_naive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ref = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert clone_mse(a, b).item() == pytest.approx(ref, rel=1e-6)
    ms = sum(y * y for y in b.flatten().tolist()) / b.numel()
    assert clone_mse(a, b, relative=True).item() == pytest.approx(ref / ms, rel=1e-6)


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
    ref = F.kl_div(F.log_softmax(s_ref / tau, -1), F.log_softmax(t.float() / tau, -1), log_target=True,
                   reduction="sum") / (2 if reduction == "batchmean" else 10)
    (ref * 1.7).backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert s.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(s.grad.float(), s_ref.grad, rtol=tol, atol=tol * 1e-2), (s.grad.float() - s_ref.grad).abs().max()


def _head_reference(h, w, b, labels, ht, wt, bt, tau, reduction, kl_weight, lm_weight):
    """kl_weight * F.kl_div + lm_weight * F.cross_entropy on whole fp32 logits (autograd)."""
    B, T, _ = h.shape
    z = F.linear(h.float(), w.float(), None if b is None else b.float())  # [B, T, V]
    loss = lm_weight * F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)
    if ht is not None:
        zt = F.linear(ht, wt, bt)
        kl = F.kl_div(F.log_softmax(z / tau, -1), F.log_softmax(zt / tau, -1), log_target=True, reduction="sum")
        loss = loss + kl_weight * kl / (B if reduction == "batchmean" else B * T)
    return loss


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
    loss, parts = losses.head_losses(h, w, labels, teacher, bias=b, temperature=tau, reduction=reduction,
                                     kl_weight=0.7, lm_weight=1.3)
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
    with torch.no_grad():
        loss2, _ = losses.head_losses(h, w, labels, (ht, wt, None), temperature=2.0)
    assert loss2.item() == pytest.approx(_head_reference(h, w, None, labels, ht, wt, None, 2.0, "batchmean",
                                                         1.0, 1.0).item(), rel=1e-5)


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
    ref = (s32 - t32).pow(2).mean()
    if relative:
        ref = ref / t32.detach().pow(2).mean()
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
