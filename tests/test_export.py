"""lrc_src.export: the exported student equals the clone (logits), for every teacher kind and
variant; student_config is the student's shape for LRC and the random-init baselines."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_teacher
from test_clone import KINDS, make_clone
from transformers import AutoModelForCausalLM

from lrc_src.clone import LowRankClone
from lrc_src.config import LRCConfig, config_from_dict
from lrc_src.export import student_config

CI = Path(__file__).resolve().parents[1] / "config" / "ci.yaml"


@pytest.mark.parametrize("kind", KINDS)
def test_export_logits_equal_clone_logits(kind, ids, tmp_path):
    lrc = make_clone(kind)
    out = lrc.clone(ids)
    with torch.no_grad():
        assert (lrc.teacher(ids).logits - out.teacher_logits).abs().max() <= 1e-4
    lrc.save_student(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    assert type(student) is type(lrc.teacher)
    assert student.config.hidden_size == 32 and student.config.head_dim == 16
    with torch.no_grad():
        diff = (student(ids).logits - out.logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("kind", ["qwen2-bias", "llama-bias"])
def test_a_bf16_teacher_clones_and_exports_as_it_comes_from_the_hub(kind, ids, tmp_path):
    """A teacher loaded in the dtype it was stored in (bf16 for Qwen2.5 and Llama-3.2): its q/k/v
    biases join the fp32 generated weights, and the student keeps the teacher's generation settings."""
    teacher = make_teacher(kind).to(torch.bfloat16)
    teacher.generation_config.eos_token_id = [2, 0]
    teacher.generation_config.temperature, teacher.generation_config.do_sample = 0.6, True
    torch.manual_seed(0)
    lrc = LowRankClone(teacher, LRCConfig(student_hidden_size=32))
    out = lrc.clone(ids)
    assert torch.isfinite(out.loss)
    lrc.save_student(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    with torch.no_grad():
        assert (student(ids).logits - out.logits).abs().max().item() <= 1e-4
    gen = student.generation_config
    assert (gen.eos_token_id, gen.temperature, gen.do_sample) == ([2, 0], 0.6, True)


def test_sliding_window_teacher_is_cloned_up_to_its_window(ids, tmp_path):
    """LRC's full causal attention is a sliding-window teacher's own up to the window: exact
    there (teacher and exported student), refused past it, also before training starts."""
    from lrc_src.factory import build_method

    lrc = make_clone("mistral-window")
    short = ids[:, :8]
    out = lrc.clone(short)
    lrc.save_student(tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    assert student.config.sliding_window == 8
    with torch.no_grad():
        assert (lrc.teacher(short).logits - out.teacher_logits).abs().max() <= 1e-4
        assert (student(short).logits - out.logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"sequences of 9 tokens .* sliding_window=8"):
        lrc.clone(ids[:, :9])
    cfg = config_from_dict(yaml.safe_load(CI.read_text()), ["lrc.student_hidden_size=32"])
    with pytest.raises(ValueError, match="sliding_window=8"):
        build_method(cfg, make_teacher("mistral-window"), ids.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saved_student_does_not_depend_on_the_device(tmp_path):
    """save_student generates on the CPU: the same file from a clone on the GPU as on the CPU."""
    from safetensors.torch import load_file

    lrc = make_clone("llama-mqa-untied")
    lrc.save_student(tmp_path / "cpu")
    lrc.cuda().save_student(tmp_path / "cuda")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lrc.export_student().lm_head.weight.device.type == "cuda"  # evaluation stays on the device


def test_export_keeps_teacher_rope_llama3():
    lrc = make_clone("llama3-rope")
    scfg = lrc.export_student().config
    assert scfg.rope_parameters["rope_type"] == "llama3"
    assert scfg.rope_parameters == lrc.teacher.config.rope_parameters


def test_odd_student_size_qwen2(ids):
    """d_T 64 -> d_S 24 (not a power of two; Qwen2 accepts any size)."""
    lrc = make_clone("qwen2-bias", d_S=22)
    out = lrc.clone(ids)
    with torch.no_grad():
        assert (lrc.export_student()(ids).logits - out.logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "variant",
    [
        dict(attn_projection="io"),
        dict(ffn_projection="io"),
        dict(alignment="extra"),
        dict(attn_out_space="teacher"),
        dict(clone_terms=()),
    ],
)
def test_export_exact_for_variants(variant, ids):
    lrc = make_clone("llama-mqa-untied", **variant)
    out = lrc.clone(ids)
    with torch.no_grad():
        assert (lrc.export_student()(ids).logits - out.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("untie", [False, True])
def test_student_config_is_the_exported_config(kind, untie):
    """student_config(teacher config, d_S) is the config of the exported student (and of the
    random-init baselines): the teacher's with hidden_size d_S, head_dim kept explicitly and the
    head tied only when the teacher's is and untie_lm_head is off."""
    from lrc_src.baselines import student_like

    lrc = make_clone(kind, untie_lm_head=untie)
    scfg = student_config(lrc.teacher.config, 32, untie_lm_head=untie)
    assert type(scfg) is type(lrc.teacher.config)
    assert scfg.to_dict() == lrc.export_student().config.to_dict()
    assert scfg.hidden_size == 32 and scfg.head_dim == 16
    assert scfg.tie_word_embeddings == (lrc.teacher.config.tie_word_embeddings and not untie)
    like = student_like(lrc.teacher, 32, seed=0)
    assert type(like) is type(lrc.teacher) and like.config.to_dict() == student_config(lrc.teacher.config, 32).to_dict()


@pytest.mark.parametrize(
    "d_S,match",
    [
        (64, "student_hidden_size=64 must be smaller"),
        (30, "student_hidden_size=30 is not a multiple of the teacher's 4"),
    ],
)
def test_student_config_rejects_bad_sizes(d_S, match):
    """The same checks as LowRankClone's, for the baselines that only need the student's shape."""
    from lrc_src.baselines import student_like

    teacher = make_teacher()
    with pytest.raises(ValueError, match=match):
        student_config(teacher.config, d_S)
    with pytest.raises(ValueError, match=match):
        student_like(teacher, d_S, seed=0)


def test_student_config_rejects_unsupported_teachers():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported teacher config GPT2Config"):
        student_config(GPT2Config(n_embd=32, n_layer=1, n_head=2), 16)
