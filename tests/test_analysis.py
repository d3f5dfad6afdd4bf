"""lrc_src.analysis against naive references on tiny random models (seeded, CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_teacher

from lrc_src import analysis
from lrc_src.clone import LowRankClone, LRCConfig


@pytest.fixture
def model():
    return make_teacher("llama-gqa-tied").requires_grad_(False)  # L 2, d 64, d_mid 96


@pytest.fixture
def blocks():
    return np.random.default_rng(0).integers(0, VOCAB, size=(5, 12))  # [N, T]


def _naive_intermediate(model, blocks):
    """act_fn(gate(x)) * up(x) of every layer, recomputed from each MLP's input: [L, N*T, d_mid]."""
    acts = {i: [] for i in range(len(model.model.layers))}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def f(mlp, inp, _out, i=i):
            x = inp[0]
            acts[i].append((mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).reshape(-1, mlp.up_proj.out_features))

        hooks.append(layer.mlp.register_forward_hook(f))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(blocks))
    for h in hooks:
        h.remove()
    return torch.stack([torch.cat(acts[i]) for i in sorted(acts)])


def test_heldout_loss_is_the_mean_next_token_cross_entropy(model, blocks):
    ids = torch.as_tensor(blocks)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    assert analysis.heldout_loss(model, blocks, batch_size=2) == pytest.approx(ref, rel=1e-5)


def test_neuron_importance_matches_the_mean_absolute_activation(model, blocks):
    imp = analysis.ffn_neuron_importance(model, blocks, batch_size=2)
    ref = _naive_intermediate(model, blocks).abs().mean(1)  # [L, d_mid]
    assert imp.shape == (2, 96)
    torch.testing.assert_close(imp, ref, rtol=1e-5, atol=1e-7)


def test_top_neurons_is_the_global_ranking():
    imp = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    naive = sorted(((float(imp[i, j]), (i, j)) for i in range(3) for j in range(10)), reverse=True)
    assert analysis.top_neurons(imp, 7) == [n for _, n in naive[:7]]


def test_random_neurons_are_distinct_seeded_and_in_range():
    a = analysis.random_neurons(3, 10, 12, seed=4)
    assert a == analysis.random_neurons(3, 10, 12, seed=4) != analysis.random_neurons(3, 10, 12, seed=5)
    assert len(set(a)) == 12 and all(0 <= i < 3 and 0 <= j < 10 for i, j in a)
    assert analysis.overlap(a, a[:5] + [(9, 9)]) == 5


def test_masking_zeroes_exactly_the_chosen_neurons(model, blocks):
    neurons = [(0, 3), (1, 7), (1, 50)]
    ids = torch.as_tensor(blocks)
    # naive: recompute each MLP with the chosen intermediate activations set to zero
    hooks = []
    for i, layer in enumerate(model.model.layers):
        keep = torch.ones(96)
        keep[[j for li, j in neurons if li == i]] = 0

        def f(mlp, inp, _out, keep=keep):
            x = inp[0]
            return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * keep)

        hooks.append(layer.mlp.register_forward_hook(f))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
        masked = analysis.mask_ffn_neurons(model, neurons)(input_ids=ids).logits
    torch.testing.assert_close(masked, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, unmasked)
    acts = _naive_intermediate(model, blocks)  # masking acts on the output, not the activation
    assert acts[0, :, 3].abs().sum() > 0


def test_singular_values_and_rank_percentiles():
    P = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    sv = analysis.singular_values(P)
    ref = np.linalg.svd(P.numpy().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(sv.numpy(), ref, rtol=1e-5)
    pct = analysis.rank_percentiles(torch.arange(11, 0, -1).float())  # 11 values, 11 .. 1
    assert pct == {0: 11.0, 10: 10.0, 50: 6.0, 90: 2.0, 100: 1.0}


def test_up_projections_reads_checkpoint_and_clone_keys(model):
    clone = LowRankClone(model, LRCConfig(student_hidden_size=32))
    state = {f"clone.{k}": v for k, v in clone.trainable_state_dict().items()}
    ups = analysis.up_projections(state)
    assert list(ups) == [0, 1] and ups[1].shape == (64, 32)
    assert torch.equal(ups[1], clone.layers[1].mlp.up_proj)
    assert list(analysis.up_projections(clone.trainable_state_dict())) == [0, 1]
    with pytest.raises(ValueError, match="up_proj"):
        analysis.up_projections({"clone.norm": torch.ones(3)})


def test_ffn_gram_is_the_neuron_space_gram_and_ignores_hidden_rotations():
    g = torch.Generator().manual_seed(0)
    W_in = torch.randn(6, 5, generator=g)  # gate/up: [d_mid, d]
    W_out = torch.randn(5, 6, generator=g)  # down: [d, d_mid]
    naive_in = torch.tensor([[float(W_in[a] @ W_in[b]) for b in range(6)] for a in range(6)])
    naive_out = torch.tensor([[float(W_out[:, a] @ W_out[:, b]) for b in range(6)] for a in range(6)])
    torch.testing.assert_close(analysis.ffn_gram(W_in, "up"), naive_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(analysis.ffn_gram(W_out, "down"), naive_out, rtol=1e-5, atol=1e-6)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))  # a rotation of the hidden space
    assert analysis.gram_mse(W_in, W_in @ Q, "gate") < 1e-10
    assert analysis.gram_mse(W_out, Q.T @ W_out, "down") < 1e-10
    ref = ((naive_in - analysis.ffn_gram(2 * W_in, "up")) ** 2).mean().item()
    assert analysis.gram_mse(W_in, 2 * W_in, "up") == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError):
        analysis.ffn_gram(W_in, "q")


def test_ffn_gram_mse_compares_teacher_and_a_generated_student(model):
    torch.manual_seed(0)
    clone = LowRankClone(model, LRCConfig(student_hidden_size=32))
    student = clone.export_student()
    rows = analysis.ffn_gram_mse(model, student)
    assert [(r["layer"], r["weight"]) for r in rows] == [(i, w) for i in range(2) for w in ("gate", "up", "down")]
    W_T = model.model.layers[1].mlp.down_proj.weight
    W_S = student.model.layers[1].mlp.down_proj.weight
    ref = ((W_T.T @ W_T - W_S.T @ W_S) ** 2).mean().item()
    assert rows[-1]["value"] == pytest.approx(ref, rel=1e-4)
    assert analysis.ffn_gram_mse(model, model)[0]["value"] == 0.0
    r1, r2 = analysis.random_like(student, 3), analysis.random_like(student, 3)
    assert torch.equal(r1.model.layers[0].mlp.up_proj.weight, r2.model.layers[0].mlp.up_proj.weight)
    assert r1.model.layers[0].mlp.up_proj.weight.shape == (96, 32)
    assert r1.config.hidden_size == 32


def test_same_corpus_spec_has_no_heldout_contamination():
    assert analysis.heldout_documents_in_train_split(["kjv"], ["kjv"], 0.02, 0) == 0.0
    # a run on a list of corpora holds out what each holds out alone (Table 4's mix runs)
    assert analysis.heldout_documents_in_train_split(["kjv"], ["python-docs", "kjv"], 0.02, 0) == 0.0
    assert analysis.heldout_documents_in_train_split(["python-docs"], ["kjv", "python-docs"], 0.02, 1) == 0.0


def test_heldout_documents_shared_by_another_corpus_are_counted(tmp_path):
    """Two corpora that share documents: the share of the first's held-out documents that the
    second trains on, against a count from each corpus's own split."""
    from lrc_src.corpora import load_document_parts
    from lrc_src.packing import split_documents

    texts = [f"document number {i}, with some words of its own." for i in range(12)]
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    for i, t in enumerate(texts):
        (a / f"{i:02d}.txt").write_text(t)
        (b / f"{11 - i:02d}.txt").write_text(t)  # the same texts in another order: another split
    (b / "12.txt").write_text("a document only the second corpus has.")
    eval_spec, run_spec = [f"local:{a}/*.txt"], [f"local:{b}/*.txt"]

    def held(spec):
        return [d["text"] for d, h in split_documents(load_document_parts(spec), 0.25, 0) if h]

    held_a, held_b = held(eval_spec), held(run_spec)
    assert len(held_a) == 3 and len(held_b) == 3
    trained = [t for t in held_a if t not in held_b]
    assert trained, "the case must share a held-out document with the other corpus's training split"
    share = analysis.heldout_documents_in_train_split(eval_spec, run_spec, 0.25, 0)
    assert share == pytest.approx(len(trained) / len(held_a))
