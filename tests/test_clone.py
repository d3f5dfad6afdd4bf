"""The core module: parameter counts, frozen teacher, loss terms against naive references,
variants, the accumulation window, compiled layers, bad input."""

import pytest
import torch
from conftest import VOCAB, make_teacher
from transformers import GPT2Config, GPT2LMHeadModel

from lrc_src import LowRankClone, LRCConfig

KINDS = ["llama-gqa-tied", "llama-mqa-untied", "llama-bias", "qwen2-bias", "llama3-rope", "mistral"]


def make_clone(kind="llama-gqa-tied", d_S=32, **kw):
    teacher = make_teacher(kind)
    torch.manual_seed(0)
    return LowRankClone(teacher, LRCConfig(student_hidden_size=d_S, **kw))


@pytest.mark.parametrize("kind", ["llama-mqa-untied", "llama-bias", "qwen2-bias"])
def test_student_weights_on_a_named_device_are_the_same(kind):
    """student_weights(device=...) copies every input (projections, norms, teacher weights and
    biases, the untied head) there: on the meta device every output is on meta, which a tensor
    left behind on the CPU would not be; named as the device the parameters are on, it generates
    the same tensors."""
    lrc = make_clone(kind, attn_projection="io")
    with torch.no_grad():
        here, there = lrc.student_weights(), lrc.student_weights(device=torch.device("cpu"))
        meta = lrc.student_weights(device=torch.device("meta"))
    assert here.keys() == there.keys() == meta.keys()
    assert all(there[k].device.type == "cpu" and torch.equal(there[k], here[k]) for k in here)
    assert [k for k in meta if meta[k].device.type != "meta"] == []
    assert all(meta[k].shape == here[k].shape for k in here)


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "llama-mqa-untied"])
@pytest.mark.parametrize("variant", ["default", "attn_io", "ffn_io", "both_io", "extra"])
def test_trainable_parameter_counts(kind, variant):
    kw = {
        "default": {},
        "attn_io": dict(attn_projection="io"),
        "ffn_io": dict(ffn_projection="io"),
        "both_io": dict(attn_projection="io", ffn_projection="io"),
        "extra": dict(alignment="extra"),
    }[variant]
    lrc = make_clone(kind, **kw)
    L, dT, dS = 2, 64, 32
    tied = kind.endswith("-tied")
    if tied:  # untie_lm_head adds exactly one P_lm
        assert (
            make_clone(kind, untie_lm_head=True, **kw).num_trainable_parameters()
            == lrc.num_trainable_parameters() + dT * dS
        )
    per_layer = {"default": 7, "attn_io": 5, "ffn_io": 6, "both_io": 4, "extra": 9}[variant]
    expected = L * per_layer * dT * dS + dT * dS * (1 if tied else 2) + (2 * L + 1) * dS
    assert lrc.num_trainable_parameters() == expected
    trainable = {n for n, p in lrc.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lrc.trainable_named_parameters()}


def test_teacher_frozen_and_projections_get_gradients(ids):
    lrc = make_clone("llama-mqa-untied", alignment="extra")
    before = {n: p.detach().clone() for n, p in lrc.teacher.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in lrc.trainable_named_parameters()], lr=1e-2)
    out = lrc.clone(ids)
    out.loss.backward()
    for n, p in lrc.trainable_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in lrc.teacher.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n


def _capture(model, ids):
    """Raw outputs of every q,k,v,o,gate,up,down linear of an HF model, per layer (hooks)."""
    acts = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in [
            ("q", layer.self_attn.q_proj),
            ("k", layer.self_attn.k_proj),
            ("v", layer.self_attn.v_proj),
            ("o", layer.self_attn.o_proj),
            ("gate", layer.mlp.gate_proj),
            ("up", layer.mlp.up_proj),
            ("down", layer.mlp.down_proj),
        ]:
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=(i, name): acts.__setitem__(key, o.detach())))
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return acts, logits


def test_loss_terms_match_naive_reference(ids):
    """Clone terms from hooks on the HF teacher and the exported HF student (independent path)."""
    lrc = make_clone("llama-mqa-untied", alpha=0.3, kl_temperature=2.0)
    out = lrc.clone(ids)
    t_acts, t_logits = _capture(lrc.teacher, ids)
    s_acts, s_logits = _capture(lrc.export_student(), ids)
    for term in ("q", "k", "v", "gate", "up", "o", "down"):
        ref = 0.0
        for i in range(2):
            target = t_acts[i, term]
            if term in ("o", "down"):
                P = (lrc.layers[i].self_attn.o_proj if term == "o" else lrc.layers[i].mlp.down_proj).detach()
                target = target @ P  # project the teacher output with the same P
            ref += ((s_acts[i, term] - target) ** 2).mean().item()
        assert out.losses[f"clone/{term}"].item() == pytest.approx(ref, rel=1e-4), term
    clone_ref = sum(out.losses[f"clone/{t}"].item() for t in ("q", "k", "v", "o", "gate", "up", "down"))
    assert out.losses["clone"].item() == pytest.approx(clone_ref, rel=1e-5)
    # KL: forward KL of tau-softened distributions, sum over positions and vocab / batch
    pt = torch.softmax(t_logits.double() / 2.0, -1)
    ps = torch.softmax(s_logits.double() / 2.0, -1)
    kl_ref = (pt * (pt.log() - ps.log())).sum().item() / ids.shape[0]
    assert out.losses["kl"].item() == pytest.approx(kl_ref, rel=1e-4)
    ce = torch.nn.functional.cross_entropy(s_logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert out.losses["lm"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(kl_ref + ce.item() + 0.3 * clone_ref, rel=1e-4)


def test_attention_output_in_teacher_space(ids):
    lrc = make_clone("llama-gqa-tied", attn_out_space="teacher")
    out = lrc.clone(ids)
    # naive: student attention (pre-o_proj) through the teacher's o_proj vs the teacher's o output
    t_in, s_in = {}, {}

    def grab(store, i):
        return lambda m, a, o: store.__setitem__(i, a[0].detach())

    student = lrc.export_student()
    hs = [m.self_attn.o_proj.register_forward_hook(grab(t_in, i)) for i, m in enumerate(lrc.teacher.model.layers)]
    hs += [m.self_attn.o_proj.register_forward_hook(grab(s_in, i)) for i, m in enumerate(student.model.layers)]
    with torch.no_grad():
        lrc.teacher(ids), student(ids)
    for h in hs:
        h.remove()
    ref = sum(
        (
            (
                lrc.teacher.model.layers[i].self_attn.o_proj(s_in[i])
                - lrc.teacher.model.layers[i].self_attn.o_proj(t_in[i])
            )
            ** 2
        )
        .mean()
        .item()
        for i in range(2)
    )
    assert out.losses["clone/o"].item() == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("term", ["q", "k", "v", "o", "gate", "up", "down"])
def test_switching_a_term_off(term, ids):
    full = make_clone()
    all_terms = ("q", "k", "v", "o", "gate", "up", "down")
    part = make_clone(clone_terms=tuple(t for t in all_terms if t != term))
    a, b = full.clone(ids), part.clone(ids)
    assert set(a.losses) - set(b.losses) == {f"clone/{term}"}
    expected = a.loss - 0.2 * a.losses[f"clone/{term}"]
    assert b.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_switches_and_layer_subsets(ids):
    lrc = make_clone(use_kl=False, use_lm=False, alpha=1.0)
    out = lrc.clone(ids)
    assert out.loss.item() == pytest.approx(out.losses["clone"].item(), rel=1e-6)
    last = make_clone(clone_layers=[1], alpha=1.0, use_kl=False, use_lm=False).clone(ids)
    half = make_clone(clone_layers=0.5, alpha=1.0, use_kl=False, use_lm=False).clone(ids)  # layer 0 of 2
    assert make_clone(clone_layers=0.5).clone_layer_ids == {0}
    assert last.loss.item() + half.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    mean = make_clone(clone_reduction="mean", alpha=1.0, use_kl=False, use_lm=False).clone(ids)
    assert mean.loss.item() == pytest.approx(out.loss.item() / 14, rel=1e-5)


def test_io_variant_terms(ids):
    out = make_clone(attn_projection="io", ffn_projection="io").clone(ids)
    assert {k for k in out.losses if k.startswith("clone/")} == {
        "clone/attn_in",
        "clone/o",
        "clone/ffn_in",
        "clone/down",
    }


def _capture_io(model, ids):
    """Per layer i: the normed inputs of the attention and the FFN (q_proj's and gate_proj's input)
    and the outputs of o_proj and down_proj of an HF model (hooks)."""
    acts, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for key, mod in (("attn_in", layer.self_attn.q_proj), ("ffn_in", layer.mlp.gate_proj)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=(i, key): acts.__setitem__(key, a[0].detach())))
        for key, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=(i, key): acts.__setitem__(key, o.detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return acts


@pytest.mark.parametrize("kind", ["llama-bias", "qwen2-bias"])
def test_io_and_extra_alignment_terms_match_naive_reference(kind, ids):
    """IO sharing: E(x^S P_in^T, x^T) of each block's normed input; alignment="extra": E(o^S A, o^T)
    of each block's output; from hooks on the HF teacher and the exported student."""
    lrc = make_clone(kind, attn_projection="io", ffn_projection="io", alignment="extra")
    out = lrc.clone(ids)
    t_acts, s_acts = _capture_io(lrc.teacher, ids), _capture_io(lrc.export_student(), ids)
    for term, block, P in (
        ("attn_in", "self_attn", "in_proj"),
        ("ffn_in", "mlp", "in_proj"),
        ("o", "self_attn", "o_align"),
        ("down", "mlp", "down_align"),
    ):
        ref = 0.0
        for i in range(2):
            M = getattr(lrc.layers[i].get_submodule(block), P).detach()
            s_side = s_acts[i, term] @ (M.T if P == "in_proj" else M)  # [B, T, d_T]
            ref += ((s_side - t_acts[i, term]) ** 2).mean().item()
        assert out.losses[f"clone/{term}"].item() == pytest.approx(ref, rel=1e-4), term


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(student_hidden_size=64), "student_hidden_size=64 must be smaller"),
        (dict(student_hidden_size=80), "student_hidden_size=80 must be smaller"),
        (dict(student_hidden_size=0), "student_hidden_size=0 must be > 0"),
        (dict(student_hidden_size=30), "student_hidden_size=30 is not a multiple of the teacher's 4"),
        (dict(student_hidden_size=32, attn_projection="shared"), "attn_projection='shared'"),
        (dict(student_hidden_size=32, clone_terms=("q", "attn_in")), "clone term 'attn_in'"),
        (dict(student_hidden_size=32, kl_reduction="mean"), "kl_reduction='mean'"),
        (dict(student_hidden_size=32, init="svd"), "init='svd'"),
        (dict(student_hidden_size=32, alignment="extra", attn_out_space="teacher"), "alignment='extra'"),
        (dict(student_hidden_size=32, clone_layers=1.5), "clone_layers=1.5"),
        (dict(student_hidden_size=32, clone_layers=False), "clone_layers=False.*alpha: 0"),
        (dict(student_hidden_size=32, clone_layers=True), "clone_layers=True"),
        (dict(student_hidden_size=32, alignment="extra", detach_targets=True), "detach_targets=true has no effect"),
        (dict(student_hidden_size=32, clone_layers=[0, 5]), r"clone_layers \[5\]"),
    ],
)
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        LowRankClone(make_teacher(), LRCConfig(**bad))


def test_unknown_setting_and_unsupported_teacher():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lrc.alhpa'\]"):
        LRCConfig.from_dict({"student_hidden_size": 8, "alhpa": 0.1})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported teacher GPT2LMHeadModel"):
        LowRankClone(gpt2, LRCConfig(student_hidden_size=16))


def test_bad_labels(ids):
    lrc = make_clone()
    with pytest.raises(ValueError, match=r"labels shape \(2, 18\)"):
        lrc.clone(ids, labels=ids[:, :-1])


@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(attn_projection="io", ffn_projection="io"),
        dict(alignment="extra"),
        dict(untie_lm_head=True, clone_normalize="relative"),
    ],
)
def test_accumulation_window_gradients_equal_per_micro_batch_generation(variant):
    """Generating the weights once per optimizer step (LowRankClone.accumulation_window, opened
    through LRCMethod as the trainer does) gives the same gradients as generating them for every
    micro-batch."""
    from lrc_src.baselines import LRCMethod

    g = torch.Generator().manual_seed(3)
    micro = [torch.randint(0, VOCAB, (2, 11), generator=g) for _ in range(3)]
    method = LRCMethod(make_clone("llama-bias", **variant))
    params = [p for _, p in method.trainable_named_parameters()]
    for ids in micro:
        (method(ids, ids).loss / 3).backward()
    per_micro = [p.grad.clone() for p in params]
    method.zero_grad(set_to_none=True)
    with method.accumulation_window():
        for ids in micro:
            (method(ids, ids).loss / 3).backward()
    for (n, p), ref in zip(method.trainable_named_parameters(), per_micro):
        assert p.grad is not None, n
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-6), (n, (p.grad - ref).abs().max().item())
    assert method.clone._window is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compile_layers_compiles_the_head(ids):
    """On CUDA, compile_layers() of LRC and of a plain student compiles the head's per-chunk work
    by default; under bf16 autocast the losses and gradients follow the eager ones."""
    from lrc_src.baselines import StudentKD, student_like

    ids = ids.cuda()
    builders = {
        "lrc": lambda: make_clone("llama-mqa-untied").cuda(),
        "kd": lambda: StudentKD(
            student_like(make_teacher("llama-bias"), 32, seed=0), make_teacher("llama-bias")
        ).cuda(),
    }
    for name, build in builders.items():
        runs = []
        for compiled in (False, True):
            method = build()
            if compiled:
                method.compile_layers()
                assert method._head_chunk is not None, name
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = method(ids)
            out.loss.backward()
            grads = {n: p.grad.float() for n, p in method.trainable_named_parameters() if p.grad is not None}
            runs.append((out.losses, grads))
        (eager, eager_grads), (comp, comp_grads) = runs
        for k, v in eager.items():
            assert comp[k].item() == pytest.approx(v.item(), rel=2e-2, abs=1e-3), (name, k)
        for k, g in eager_grads.items():
            assert (comp_grads[k] - g).norm() <= 5e-2 * g.norm() + 1e-6, (name, k)


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "llama-bias", "qwen2-bias"])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_student_kd_fused_head_equals_logits_path(kind, with_teacher, ids):
    """scratch/kd/prune_kd/sft take KL and LM through head_losses on the decoders' hidden states;
    value and gradients equal the whole-logits path (kl_loss + lm_loss on HF logits)."""
    from lrc_src.baselines import StudentKD, student_like

    teacher = make_teacher(kind)
    method = StudentKD(student_like(teacher, 32, seed=0), teacher if with_teacher else None, kl_temperature=3.0)
    labels = ids.clone()
    labels[0, :5] = -100
    fused = method(ids, labels)
    fused.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.trainable_named_parameters()}
    method.zero_grad()
    ref = method._forward_logits(ids, labels)
    ref.loss.backward()
    assert set(fused.losses) == set(ref.losses) == ({"kl", "lm"} if with_teacher else {"lm"})
    for k in ref.losses:
        assert fused.losses[k].item() == pytest.approx(ref.losses[k].item(), rel=1e-4, abs=1e-6), k
    for n, p in method.trainable_named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in teacher.parameters())


def test_clone_output_logits_outside_autocast(ids):
    """CloneOutput.logits / .teacher_logits, formed on demand, work after a bf16-autocast forward
    (bf16 generated head, fp32 hidden states) and agree with the fp32 forward to bf16 rounding."""
    lrc = make_clone("llama-mqa-untied")
    ref = lrc.clone(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lrc.clone(ids)
    for got, want in ((out.logits, ref.logits), (out.teacher_logits, ref.teacher_logits)):
        assert got.shape == (*ids.shape, VOCAB)
        assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("llama-mqa-untied", {}),
        ("llama-bias", dict(attn_projection="io", ffn_projection="io", detach_targets=True)),
        ("qwen2-bias", dict(alignment="extra", clone_layers=0.5)),
        ("llama-gqa-tied", dict(attn_out_space="teacher", clone_normalize="relative")),
    ],
)
def test_compiled_layers_match_eager(kind, kw, ids):
    """compile_layers(): the same losses and gradients as eager (fp32), and one compiled graph per
    distinct set of clone terms, not one per layer (the layer step takes no layer index). One case
    compiles the head's per-chunk work too (head=True: CUDA's default), one more graph."""
    from torch._dynamo.utils import counters

    head = kind == "llama-gqa-tied"
    runs = []
    for compiled in (False, True):
        lrc = make_clone(kind, **kw)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            lrc.compile_layers(head=head)
            assert (lrc._head_chunk is not None) == head
        out = lrc.clone(ids)
        out.loss.backward()
        runs.append(
            (
                out.losses,
                {n: p.grad for n, p in lrc.trainable_named_parameters() if p.grad is not None},
                out.hidden.detach(),
                out.teacher_hidden,
            )
        )
    distinct_terms = len({i in lrc.clone_layer_ids for i in range(lrc.num_layers)})
    assert counters["stats"]["unique_graphs"] == distinct_terms + head, dict(counters["stats"])
    (eager_losses, eager_grads, *eager_h), (comp_losses, comp_grads, *comp_h) = runs
    for a, b in zip(eager_h, comp_h):  # the student's and the teacher's final hidden states
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert eager_losses.keys() == comp_losses.keys() and eager_grads.keys() == comp_grads.keys()
    for k, v in eager_losses.items():  # the KL between nearly equal distributions is tiny: absolute
        assert comp_losses[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6 if k == "kl" else 1e-7), k
    for k, g in eager_grads.items():
        assert (comp_grads[k] - g).norm() <= 1e-5 * g.norm() + 1e-8, k
