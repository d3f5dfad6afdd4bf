"""The baselines LRC is compared against at equal training tokens, and the shared method interface
the trainer drives. They are the kinds of method the paper (arXiv 2505.12781) compares LRC with:
training from scratch, knowledge distillation, TinyBERT-style feature distillation and
Minitron-style pruning followed by distillation; sft is the fine-tuning stage.

Every method is an nn.Module with
    forward(input_ids [B, T], labels [B, T] | None) -> MethodOutput(loss, losses: dict of scalars)
    export(directory, tokenizer)   -> a plain HF folder of the student
    eval_model()                   -> an HF causal LM of the student (for held-out loss)

  scratch   a student of the LRC student's shape (teacher config with hidden_size = d_S), random
            init (the config's initializer_range), next-token LM loss only.
  kd        the same random student, L = KL(p_T || p_S) + LM.
  tinybert  the same random student, L = KL + LM + hidden_weight * sum_i E(h^S_i A_i, h^T_i)
            + attn_weight * sum_i E(att^S_i, att^T_i): a learned d_S -> d_T map A_i per layer for
            the hidden states (embedding output and every layer output) and the attention
            probabilities [B, H, T, T] of every layer (heads are shared).
  prune_kd  LRC's teacher-derived start (lrc.init; normal means prune) exported once as a plain
            student (`hard_prune`), then KL + LM: the control "LRC's start, no clone loss".
            init=prune is Minitron-style hard pruning: keep the d_S hidden channels with the largest
            mean |RMSNorm output| of the teacher on calibration batches (the same channels in the
            embeddings, every weight and every norm); prune_scaled also rescales the kept norms and
            pca rotates instead of selecting (LRCConfig.init).
  sft       supervised fine-tuning of an HF model, LM loss on the assistant tokens only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel

from lrc_src.clone import LowRankClone, LRCConfig
from lrc_src.export import SUPPORTED_CONFIGS, student_config
from lrc_src.losses import clone_mse, compiled_head_for, head_losses, kl_loss, lm_loss
from lrc_src.runtime import compile_decoder_layers


@dataclass
class MethodOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _fusable(model: nn.Module) -> bool:
    """Whether model's logits are exactly lm_head(model.model(...).last_hidden_state): true for the
    Llama / Qwen2 / Mistral classes LRC supports (no logit soft-capping or scaling)."""
    return type(model.config) in SUPPORTED_CONFIGS and isinstance(getattr(model, "lm_head", None), nn.Linear)


@contextlib.contextmanager
def attention_kernel(model: PreTrainedModel, impl: str):
    """Run model with attention kernel impl ("eager", "sdpa", ...) inside the block and give it back
    its own after: transformers reads `config._attn_implementation` at each forward."""
    own = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        yield model
    finally:
        model.config._attn_implementation = own


def random_init(model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised model_class(config), its weights drawn after torch.manual_seed(seed)
    (the config's initializer_range): the random start of scratch, kd and tinybert."""
    torch.manual_seed(seed)
    return model_class(config)


def student_like(teacher: PreTrainedModel, d_S: int, seed: int) -> PreTrainedModel:
    """A randomly initialised model of the LRC student's shape (same validation as LRC)."""
    return random_init(type(teacher), student_config(teacher.config, d_S), seed)


def hard_prune(
    teacher: PreTrainedModel,
    d_S: int,
    calibration_ids: torch.Tensor | None,
    init: str = "prune",
    untie_lm_head: bool = False,
) -> PreTrainedModel:
    """The teacher with all but the d_S most important hidden channels removed (Minitron-style).

    Implemented as LRC's one-hot `init="prune"` start exported once: every projection selects
    the kept channels and the norms keep the teacher's weights there (tested against slicing).
    init="prune_scaled" rescales the norms, init="pca" rotates instead of selecting (see
    LRCConfig.init): the control "same start, no clone loss" for those LRC starts.
    calibration_ids: [B, T]; None gives the pruned student's architecture only, for weights loaded next.
    """
    if init == "normal":
        raise ValueError("hard_prune needs a teacher-derived start: init='prune', 'prune_scaled' or 'pca'")
    lrc = LowRankClone(teacher, LRCConfig(student_hidden_size=d_S, init=init, untie_lm_head=untie_lm_head))
    if calibration_ids is not None:
        lrc.init_from_teacher(calibration_ids)
    return lrc.export_student()


class StudentKD(nn.Module):
    """A plain HF student trained with LM (+ optional KL to a frozen teacher): scratch, kd, prune_kd, sft."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None = None,
        kl_temperature: float = 40.0,
        kl_reduction: str = "batchmean",
    ):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # the fused head (`head_losses` on the decoders' outputs) when every model allows it
        self._fused = _fusable(student) and (teacher is None or _fusable(teacher))
        self.kl_temperature, self.kl_reduction = kl_temperature, kl_reduction
        self._head_chunk = None  # the head's per-chunk fp32 work compiled (compile_layers); None: eager

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def compile_layers(self, head: bool | None = None, **options) -> None:
        """torch.compile the student's and the teacher's decoder layers (`compile_decoder_layers`);
        head: the head's per-chunk work too, as `LowRankClone.compile_layers` (None: on CUDA)."""
        compile_decoder_layers(self.student, **options)
        compile_decoder_layers(self.teacher, **options)
        self._head_chunk = compiled_head_for(self.student.device, head, **options)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        labels = input_ids if labels is None else labels
        if not self._fused:
            return self._forward_logits(input_ids, labels)
        # the decoders' final-norm outputs; head_losses forms the logits chunk by chunk
        h_s = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d_S]
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                h_t = self.teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d_T]
            teacher = (h_t, self.teacher.lm_head.weight, self.teacher.lm_head.bias)
        loss, losses = head_losses(
            h_s,
            self.student.lm_head.weight,
            labels,
            teacher,
            bias=self.student.lm_head.bias,
            temperature=self.kl_temperature,
            reduction=self.kl_reduction,
            chunk_losses=self._head_chunk,
        )
        if self.teacher is None:
            del losses["kl"]
        return MethodOutput(loss, losses)

    def _forward_logits(self, input_ids: torch.Tensor, labels: torch.Tensor) -> MethodOutput:
        """The same losses on whole logits, for models `head_losses` cannot split (see `_fusable`)."""
        logits = self.student(input_ids=input_ids).logits  # [B, T, V]
        losses = {"lm": lm_loss(logits, labels)}
        loss = losses["lm"]
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=input_ids).logits  # [B, T, V]
            losses["kl"] = kl_loss(logits, t_logits, self.kl_temperature, self.kl_reduction)
            loss = loss + losses["kl"]
        return MethodOutput(loss, losses)

    def eval_model(self) -> PreTrainedModel:
        return self.student

    def export(self, directory: str | Path, tokenizer=None) -> Path:
        self.student.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return Path(directory)


class TinyBERTStyle(StudentKD):
    """Random student + hidden-state MSE through learned d_S -> d_T maps + attention-map MSE + KL + LM."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        hidden_weight: float = 1.0,
        attn_weight: float = 1.0,
        use_kl: bool = True,
        **kw,
    ):
        super().__init__(student, teacher, **kw)
        self.use_kl = use_kl  # the KL is always reported; in the loss only when use_kl
        # Attention probabilities need the eager kernel (SDPA returns none). The student is this
        # method's own; the teacher may be shared, so it runs eagerly only inside `forward`.
        student.config._attn_implementation = "eager"
        d_S, d_T = student.config.hidden_size, teacher.config.hidden_size
        L = teacher.config.num_hidden_layers
        self.hidden_maps = nn.ParameterList(
            [nn.Parameter(torch.randn(d_S, d_T) * student.config.initializer_range) for _ in range(L + 1)]
        )
        self.hidden_weight, self.attn_weight = hidden_weight, attn_weight

    compilable = False  # train.compile=auto runs it eagerly

    def compile_layers(self, head: bool | None = None, **options) -> None:
        raise ValueError(
            "tinybert cannot be compiled: transformers' capture of every layer's hidden states and "
            "attention maps breaks torch.compile's graph in each layer; train it without --compile"
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        labels = input_ids if labels is None else labels
        s = self.student(input_ids=input_ids, output_hidden_states=True, output_attentions=True)
        with torch.no_grad(), attention_kernel(self.teacher, "eager"):
            t = self.teacher(input_ids=input_ids, output_hidden_states=True, output_attentions=True)
        # hidden_states: L+1 tensors [B, T, d]; attentions: L tensors [B, H, T, T]
        hidden = sum(clone_mse(hs @ A, ht) for hs, ht, A in zip(s.hidden_states, t.hidden_states, self.hidden_maps))
        attn = sum(clone_mse(a_s, a_t) for a_s, a_t in zip(s.attentions, t.attentions))
        losses = {
            "lm": lm_loss(s.logits, labels),
            "kl": kl_loss(s.logits, t.logits, self.kl_temperature, self.kl_reduction),
            "hidden": hidden,
            "attn": attn,
        }
        loss = losses["lm"] + losses["kl"] if self.use_kl else losses["lm"]
        loss = loss + self.hidden_weight * hidden + self.attn_weight * attn
        return MethodOutput(loss, losses)


class LRCMethod(nn.Module):
    """LowRankClone behind the common method interface."""

    def __init__(self, clone: LowRankClone):
        super().__init__()
        self.clone = clone

    def trainable_named_parameters(self):
        return [(f"clone.{n}", p) for n, p in self.clone.trainable_named_parameters()]

    def compile_layers(self, head: bool | None = None, **options) -> None:
        """torch.compile the per-layer step of teacher and student and, on CUDA, the head's
        per-chunk work (`LowRankClone.compile_layers`)."""
        self.clone.compile_layers(head, **options)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        out = self.clone.clone(input_ids, labels)
        return MethodOutput(out.loss, out.losses)

    @contextlib.contextmanager
    def accumulation_window(self):
        """The student's weights generated once per optimizer step (`LowRankClone.accumulation_window`)."""
        with self.clone.accumulation_window():
            yield self

    def eval_model(self) -> PreTrainedModel:
        return self.clone.export_student()

    def export(self, directory: str | Path, tokenizer=None) -> Path:
        return self.clone.save_student(directory, tokenizer)
