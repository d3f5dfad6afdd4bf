"""The student as a plain transformers model: its config, its materialised weights, its folder.

An LRC student is the teacher's architecture with hidden size d_S: the same class (Llama, Qwen2 or
Mistral), layers, heads, head_dim, FFN width and vocabulary. `student_config` is that config (also
the shape of the random-init baselines); `export_student` generates the weights once (Eq. 3-5,
`LowRankClone.student_weights`) into a model whose logits equal the clone's; `save_student` writes
it as an HF folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

if TYPE_CHECKING:
    from lrc_src.clone import LowRankClone

# Teacher families, chosen by config class (never by a substring of a name or path).
SUPPORTED_CONFIGS: dict[type, type] = {
    LlamaConfig: LlamaForCausalLM,
    Qwen2Config: Qwen2ForCausalLM,
    MistralConfig: MistralForCausalLM,
}
# transformers 5's LlamaConfig/MistralConfig reject hidden_size % num_attention_heads != 0 even
# with head_dim set (Qwen2Config accepts it): the export could not be loaded.
NEEDS_DIVISIBLE_HIDDEN = (LlamaConfig, MistralConfig)


def head_dim(config: PretrainedConfig) -> int:
    """The attention head size, which the student keeps (explicit, or hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_student_size(teacher_config: PretrainedConfig, d_S: int) -> None:
    """ValueError unless a student of hidden size d_S can be exported in teacher_config's class."""
    d_T, n_heads = teacher_config.hidden_size, teacher_config.num_attention_heads
    if d_S >= d_T:
        raise ValueError(f"student_hidden_size={d_S} must be smaller than the teacher's hidden_size={d_T}")
    if isinstance(teacher_config, NEEDS_DIVISIBLE_HIDDEN) and d_S % n_heads != 0:
        lo, hi = (d_S // n_heads) * n_heads, (d_S // n_heads + 1) * n_heads
        raise ValueError(
            f"student_hidden_size={d_S} is not a multiple of the teacher's {n_heads} attention heads; "
            f"transformers' {type(teacher_config).__name__} could not load the exported student "
            f"(use e.g. {lo or hi} or {hi})"
        )
    if "sliding_attention" in (getattr(teacher_config, "layer_types", None) or []):
        raise ValueError("teachers with sliding-window attention layers are not supported")


def attention_window(config: PretrainedConfig) -> int | None:
    """The sliding window every attention layer of this teacher applies (Mistral's
    `sliding_window`), or None. LRC's attention is full causal: the teacher's own only up to that
    many tokens. (Configs with per-layer `layer_types`, such as Qwen2's, are refused by
    `check_student_size` when a layer slides.)"""
    if getattr(config, "layer_types", None) is not None:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def student_config(teacher_config: PretrainedConfig, d_S: int, untie_lm_head: bool = False) -> PretrainedConfig:
    """The teacher's config with hidden_size = d_S and head_dim set explicitly; the head stays tied
    when the teacher's is, unless untie_lm_head (LRCConfig.untie_lm_head)."""
    if type(teacher_config) not in SUPPORTED_CONFIGS:
        allowed = ", ".join(c.__name__ for c in SUPPORTED_CONFIGS)
        raise ValueError(f"unsupported teacher config {type(teacher_config).__name__}; allowed: {allowed}")
    check_student_size(teacher_config, d_S)
    tied = bool(getattr(teacher_config, "tie_word_embeddings", False)) and not untie_lm_head
    d = teacher_config.to_dict()
    for k in (
        "_name_or_path",
        "quantization_config",
        "architectures",
        "transformers_version",
        "_attn_implementation_autoset",
        "dtype",
        "torch_dtype",
    ):
        d.pop(k, None)
    d.update(hidden_size=d_S, head_dim=head_dim(teacher_config), tie_word_embeddings=tied)
    return type(teacher_config)(**d)


@torch.no_grad()
def export_student(clone: LowRankClone, device: str | torch.device | None = None) -> PreTrainedModel:
    """Materialise clone's student once into a plain transformers model of the teacher's class.

    device: where to generate its weights and put it (default: where the projections are).
    """
    scfg = student_config(clone.teacher.config, clone.d_S, clone.config.untie_lm_head)
    model_cls = SUPPORTED_CONFIGS[type(scfg)]
    device = clone.norm.device if device is None else torch.device(device)
    student = model_cls(scfg).to(device)
    W = {k: v.detach().float().contiguous() for k, v in clone.student_weights(device=device).items()}
    if clone.student_tied:
        W["lm_head.weight"] = W["model.embed_tokens.weight"]
    missing, unexpected = student.load_state_dict(W, strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing  # tied head
    if clone.student_tied:
        student.tie_weights()
    # the teacher's generation settings (stop tokens, sampling defaults), not ones rebuilt from config.json
    student.generation_config = copy.deepcopy(clone.teacher.generation_config)
    student.eval()
    return student


def save_student(clone: LowRankClone, directory: str | Path, tokenizer=None) -> Path:
    """Write clone's exported student (safetensors + config, + tokenizer) to `directory`.

    Its weights are generated on the CPU whatever device trained the projections: GPU and CPU
    matmuls round differently, and a saved student must not depend on where it was saved (the
    end of a GPU run and `lrc export` of its checkpoint on a laptop write the same file).
    """
    directory = Path(directory)
    student = export_student(clone, device="cpu")
    student.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
