"""lrc_src.starts: the teacher-derived starts (prune, prune_scaled, pca) against naive
constructions on tiny teachers."""

import pytest
import torch
from conftest import make_teacher
from test_clone import make_clone
from transformers import AutoModelForCausalLM

from lrc_src import LowRankClone, LRCConfig
from lrc_src.export import student_config


def _sliced_teacher(lrc, keep, norm_scale=lambda name: 1.0):
    """The teacher with only the hidden channels `keep` (naive slicing of its state dict); each norm
    weight times norm_scale(<norm name, e.g. "layers.1.input_layernorm">)."""
    t = lrc.teacher
    sd = {}
    for k, v in t.state_dict().items():
        if k.endswith(
            ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
        ) or k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:, keep]
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            v = v[keep, :]
        elif k.endswith("norm.weight"):
            v = v[keep] * norm_scale(k[len("model.") : -len(".weight")])
        sd[k] = v
    pruned = type(t)(student_config(t.config, lrc.d_S))
    pruned.load_state_dict(sd)
    pruned.tie_weights()
    return pruned


def test_prune_init_is_hard_pruned_teacher(ids):
    """starts.prune: the exported student equals the teacher with channels sliced out."""
    lrc = make_clone("llama-mqa-untied", init="prune")
    keep = lrc.init_from_teacher(ids)
    assert keep.shape == (32,) and torch.all(keep[1:] > keep[:-1])
    pruned = _sliced_teacher(lrc, keep)
    with torch.no_grad():
        assert (pruned(ids).logits - lrc.export_student()(ids).logits).abs().max() <= 1e-5
        assert (pruned(ids).logits - lrc.clone(ids).logits).abs().max() <= 1e-4


def _norm_inputs(model, ids):
    """Inputs of every RMSNorm of an HF model, keyed like lrc_src.starts.teacher_norm_statistics."""
    xs, hooks = {}, []
    names = ["norm"] + [
        f"layers.{i}.{n}"
        for i in range(len(model.model.layers))
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    for n in names:
        hooks.append(
            model.model.get_submodule(n).register_forward_hook(
                lambda m, a, o, key=n: xs.__setitem__(key, a[0].detach().reshape(-1, a[0].shape[-1]))
            )
        )
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return xs


def test_prune_scaled_init_rescales_each_norm(ids):
    """prune_scaled = the sliced teacher with each norm weight times sqrt(f d_T / d_S), f the mean
    share of that norm's input energy in the kept channels (naive per-token reference)."""
    lrc = make_clone("llama-gqa-tied", init="prune_scaled")
    keep = lrc.init_from_teacher(ids)
    t = lrc.teacher
    xs = _norm_inputs(t, ids)

    def c(name):
        x = xs[name]
        f = ((x[:, keep] ** 2).sum(-1) / (x**2).sum(-1)).mean().item()
        return (f * 64 / 32) ** 0.5

    assert c("layers.1.input_layernorm") > 1.0  # the kept channels carry more than half the energy
    pruned = _sliced_teacher(lrc, keep, norm_scale=c)
    with torch.no_grad():
        assert (pruned(ids).logits - lrc.export_student()(ids).logits).abs().max() <= 1e-4


def _low_rank_residual_teacher(kind: str, r: int):
    """A teacher whose residual stream lies in an r-dim subspace: embedding rows and every
    o_proj/down_proj output (weights and biases) projected onto span(Q), Q [d_T, r]. RMSNorm eps
    is made negligible: the random teacher's residual is tiny (mean square ~1e-4), and eps is the
    one thing a rotation to fewer channels cannot carry over exactly."""
    t = make_teacher(kind)
    t.config.rms_norm_eps = 1e-12
    for m in t.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12
    torch.manual_seed(5)
    Q = torch.linalg.qr(torch.randn(64, r)).Q  # [d_T, r]
    with torch.no_grad():
        t.model.embed_tokens.weight.copy_(t.model.embed_tokens.weight @ Q @ Q.T)
        for layer in t.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_(Q @ Q.T @ lin.weight)  # [d_T, in]
                if lin.bias is not None:
                    lin.bias.copy_(Q @ Q.T @ lin.bias)
    return t


@pytest.mark.parametrize(
    "kind,untie", [("llama-gqa-tied", True), ("llama-mqa-untied", False), ("llama-bias", False), ("qwen2-bias", True)]
)
@pytest.mark.parametrize("variant", [{}, dict(attn_projection="io", ffn_projection="io")])
def test_pca_init_exact_when_residual_is_low_rank(kind, untie, variant, ids, tmp_path):
    """With the residual stream in <= d_S dims and an untied student head, the PCA start is the
    teacher itself: student logits equal the teacher's."""
    t = _low_rank_residual_teacher(kind, r=24)
    torch.manual_seed(0)
    lrc = LowRankClone(t, LRCConfig(student_hidden_size=32, init="pca", untie_lm_head=untie, **variant))
    U = lrc.init_from_teacher(ids)
    assert U.shape == (64, 32)
    assert torch.allclose(U.T @ U, torch.eye(32), atol=1e-5)
    with torch.no_grad():
        t_logits = t(ids).logits
        out = lrc.clone(ids)
    scale = t_logits.abs().max().item()
    assert (out.logits - t_logits).abs().max().item() <= 1e-4 * max(scale, 1.0)
    lrc.save_student(tmp_path / "s")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    assert student.config.tie_word_embeddings is False
    with torch.no_grad():
        assert (student(ids).logits - t_logits).abs().max().item() <= 1e-4 * max(scale, 1.0)


def test_pca_init_tied_head_is_approximate_but_close(ids):
    """A tied student head cannot absorb gamma_final exactly: the start is approximate, but much
    closer to the teacher than the authors' random start (KL to the teacher)."""
    t = _low_rank_residual_teacher("llama-gqa-tied", r=24)
    kls = {}
    for init in ("normal", "pca"):
        torch.manual_seed(0)
        lrc = LowRankClone(
            t, LRCConfig(student_hidden_size=32, init=init, kl_temperature=1.0, kl_reduction="token_mean")
        )
        lrc.init_from_teacher(ids)
        with torch.no_grad():
            out = lrc.clone(ids)
            kls[init] = out.losses["kl"].item()
            assert (lrc.export_student()(ids).logits - out.logits).abs().max() <= 1e-4
    assert kls["pca"] < 0.5 * kls["normal"], kls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("init", ["prune", "prune_scaled", "pca"])
def test_teacher_inits_on_cuda_with_cpu_ids(init, ids):
    lrc = make_clone("llama-mqa-untied", init=init).cuda()
    lrc.init_from_teacher(ids)  # ids on the CPU: moved to the model's device
    with torch.no_grad():
        assert torch.isfinite(lrc.clone(ids.cuda()).loss)
