"""Each loss function against a naive loop written independently of lrc_src.losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from lrc_src.losses import clone_mse, kl_loss, lm_loss


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
