"""Low-Rank Clone (Hao et al., arXiv 2505.12781): a student whose weights are generated from a
frozen teacher's by trainable low-rank projections, trained to clone the teacher's activations.

Notation (row vectors, as in the paper): teacher hidden size d_T, student hidden size d_S < d_T.
Only the hidden size shrinks; layers, query/KV heads, head_dim, FFN width and vocabulary stay.

Weight generation (Eq. 3-5). One trainable P in R^{d_T x d_S} per layer and weight
m in {q, k, v, o, gate, up, down}, plus P_emb (and P_lm when the head is untied). In HF's
nn.Linear layout (weight is [out, in]):

    q_proj^S   = q_proj^T @ P_q          [n_heads*hd, d_T] @ [d_T, d_S]      (same for k, v, gate, up)
    o_proj^S   = P_o^T @ o_proj^T        [d_S, d_T] @ [d_T, n_heads*hd]      (same for down)
    embed^S    = embed^T @ P_emb         [V, d_T] @ [d_T, d_S]
    lm_head^S  = lm_head^T @ P_lm        (P_emb when the teacher ties embeddings)

Biases whose size is not d_T (Qwen2's q/k/v) are kept; an output bias b (Llama's optional
o_proj/down_proj bias) becomes b @ P. Student RMSNorm weights are new trainable d_S vectors.

Activation clone loss (Eq. 7-8), per layer, E = MSE over all elements:

    L_clone = sum_i [ sum_{m in q,k,v,gate,up} E(h^S_m, h^T_m) + E(o^S_attn, o^T_attn P_o)
                      + E(o^S_ffn, o^T_ffn P_down) ]

h_m are raw linear outputs (q/k/v before RoPE, gate before SiLU). The output terms compare in the
student space through the same P that built the weight: no extra alignment matrices.

Total (Eq. 9): L = L_KL + L_LM + alpha * L_clone. The functions are in `lrc_src.losses`.

Variants (all configuration, see `LRCConfig`): drop clone terms or layers; IO sharing of one P
across q,k,v and/or gate,up; extra alignment matrices ("w/o Alignment-Free"); attention-output
term in the teacher space (the authors' code); KL temperature and reduction; initialisation.

The teacher and student run side by side, layer by layer, in one functional forward that mirrors
transformers' `modeling_llama.py` (RMSNorm in fp32, RoPE from the teacher's own rotary module,
SDPA causal attention). `export_student()` materialises the weights once into a plain
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` whose logits equal `clone().logits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lrc_src.losses import KL_REDUCTIONS, clone_mse, head_losses

# Teacher families, chosen by config class (never by a substring of a name or path).
SUPPORTED_CONFIGS: dict[type, type] = {
    LlamaConfig: LlamaForCausalLM,
    Qwen2Config: Qwen2ForCausalLM,
    MistralConfig: MistralForCausalLM,
}
# transformers 5's LlamaConfig/MistralConfig reject hidden_size % num_attention_heads != 0 even
# with head_dim set (Qwen2Config accepts it): the export could not be loaded.
NEEDS_DIVISIBLE_HIDDEN = (LlamaConfig, MistralConfig)

ATTN_TERMS = {"all": ("q", "k", "v", "o"), "io": ("attn_in", "o")}
FFN_TERMS = {"all": ("gate", "up", "down"), "io": ("ffn_in", "down")}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
# torch.compile options under every compile_layers(): training shapes are fixed, and a new shape
# (or a teacher's and a student's layers sharing one code object) gets its own static graph
COMPILE_DEFAULTS = {"dynamic": False}
ALL_TERMS = ("q", "k", "v", "o", "gate", "up", "down", "attn_in", "ffn_in")
INITS = ("normal", "prune", "prune_scaled", "pca")


@dataclass
class LRCConfig:
    """Settings of the method; the defaults are the paper's (LRC-1.5B).

    student_hidden_size: d_S (required). 0 < d_S < d_T; for Llama/Mistral teachers a multiple of
        the query-head count.
    alpha: weight of the clone loss (paper: 0.2 for LRC-1.5B, 0.5 for LRC-1.7B/4B).
    kl_temperature: tau of the logit KL (paper 40).
    kl_reduction: "batchmean" (authors: sum over positions and vocab / batch size, grows with the
        sequence length) or "token_mean" (the same sum / number of tokens).
    clone_terms: which clone terms are on. None = every term of the variant: q,k,v,o,gate,up,down
        with "all" projections; attn_in,o with attn_projection="io"; ffn_in,down with
        ffn_projection="io". An empty tuple = "w/o All Clone".
    clone_layers: layers with a clone loss: None = all; a list of layer indices; or a fraction in
        (0, 1] = that share of layers, evenly spaced (Figure 7).
    attn_projection: "all" = separate P_q, P_k, P_v (default); "io" = one P shared by q,k,v, with
        the clone loss on the attention input (E(x^S P^T, x^T) of the normed input) and output.
    ffn_projection: "all" = separate P_gate, P_up; "io" = one P shared by gate,up, loss on the FFN
        input and output.
    alignment: "free" = output terms use the weight's own P (default); "extra" = extra trainable
        d_S -> d_T matrices per layer for the o and down terms, compared in the teacher space
        (the "w/o Alignment-Free" ablation).
    attn_out_space: "student" = E(o^S, o^T P_o) (paper); "teacher" = E(o_proj^T(attn^S),
        o_proj^T(attn^T)) (the authors' code).
    init: "normal" = every projection N(0, init_std) (authors). The others start from the teacher
        and need calibration ids (`LowRankClone.init_from_teacher`):
        "prune" = the hard-pruned model: every P is the one-hot selection S of the d_S most
        important hidden channels, student norms = the teacher's at those channels;
        "prune_scaled" = the same, each student norm weight times c = sqrt(f * d_T / d_S), where f
        is the share of that norm's input energy in the kept channels (the RMS over fewer channels
        is larger; c undoes it on average);
        "pca" = SliceGPT-style rotation: U [d_T, d_S] = top eigenvectors of the second moment of the
        unit-normalised residual stream (every RMSNorm input); P_emb = P_o = P_down = U, input-side
        P = c * diag(gamma) @ U with the preceding norm's gamma and c as above, student norms 1.
        Exact when the residual stream lies in a d_S-dim subspace and the student head is untied
        (a tied head cannot absorb the final norm's gamma in a rotated basis; then the final norm
        gets the least-squares diagonal c * diag(U^T diag(gamma) U)).
    untie_lm_head: give the student its own P_lm even when the teacher ties embeddings (the
        exported student then has an untied head); needed for an exact "pca" start.
    detach_targets: detach the projected teacher targets (o^T P_o, o^T P_down). The authors do
        not (False), so P_o/P_down also receive gradient through the target.
    clone_normalize: "none" (paper) or "relative" (each term divided by its target's mean square).
    clone_reduction: "sum" over layers and terms (paper) or "mean" over them.
    use_kl, use_lm: include the KL / LM terms in `.loss` (they are always reported in `.losses`).
    """

    student_hidden_size: int
    alpha: float = 0.2
    kl_temperature: float = 40.0
    kl_reduction: str = "batchmean"
    clone_terms: tuple[str, ...] | None = None
    clone_layers: Any = None  # None | list[int] | float in (0, 1]
    attn_projection: str = "all"
    ffn_projection: str = "all"
    alignment: str = "free"
    attn_out_space: str = "student"
    init: str = "normal"
    init_std: float = 0.02
    untie_lm_head: bool = False
    detach_targets: bool = False
    clone_normalize: str = "none"
    clone_reduction: str = "sum"
    use_kl: bool = True
    use_lm: bool = True

    def __post_init__(self) -> None:
        choices = {
            "attn_projection": tuple(ATTN_TERMS),
            "ffn_projection": tuple(FFN_TERMS),
            "alignment": ("free", "extra"),
            "attn_out_space": ("student", "teacher"),
            "init": INITS,
            "kl_reduction": KL_REDUCTIONS,
            "clone_normalize": ("none", "relative"),
            "clone_reduction": ("sum", "mean"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if not isinstance(self.student_hidden_size, int) or isinstance(self.student_hidden_size, bool):
            raise ValueError(f"student_hidden_size={self.student_hidden_size!r} must be an int")
        if self.student_hidden_size <= 0:
            raise ValueError(f"student_hidden_size={self.student_hidden_size} must be > 0")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature={self.kl_temperature} must be > 0")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0")
        if self.alignment == "extra" and self.attn_out_space == "teacher":
            raise ValueError(
                "alignment='extra' already compares outputs in the teacher space; "
                "attn_out_space='teacher' is only meaningful with alignment='free'"
            )
        valid = self.valid_terms
        if self.clone_terms is None:
            self.clone_terms = valid
        else:
            if isinstance(self.clone_terms, str):
                raise ValueError(f"clone_terms={self.clone_terms!r} must be a list of terms, e.g. ['q', 'k']")
            self.clone_terms = tuple(self.clone_terms)
            for t in self.clone_terms:
                if t not in valid:
                    raise ValueError(
                        f"clone term {t!r} is not valid with attn_projection={self.attn_projection!r}, "
                        f"ffn_projection={self.ffn_projection!r}; allowed: {valid}"
                    )
            if len(set(self.clone_terms)) != len(self.clone_terms):
                raise ValueError(f"clone_terms={self.clone_terms} has duplicates")
        cl = self.clone_layers
        if cl is not None and not isinstance(cl, (list, tuple, float, int)):
            raise ValueError(f"clone_layers={cl!r} must be null, a list of layer indices or a fraction")
        if isinstance(cl, (float, int)) and not isinstance(cl, bool) and not (0 < cl <= 1):
            raise ValueError(f"clone_layers={cl} as a fraction must be in (0, 1]")
        if isinstance(cl, (list, tuple)):
            self.clone_layers = [int(i) for i in cl]

    @property
    def valid_terms(self) -> tuple[str, ...]:
        return ATTN_TERMS[self.attn_projection] + FFN_TERMS[self.ffn_projection]

    @classmethod
    def from_dict(cls, d: dict) -> "LRCConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LRC setting(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass
class CloneOutput:
    loss: torch.Tensor  # scalar: KL + LM + alpha * clone, honouring the switches
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, see LowRankClone.clone
    hidden: torch.Tensor | None = None  # [B, T, d_S] the student's final-norm output
    head: torch.Tensor | None = None  # [V, d_S] the student's LM head
    teacher_hidden: torch.Tensor | None = None  # [B, T, d_T]
    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # ([V, d_T], bias)

    @property
    def logits(self) -> torch.Tensor:
        """[B, T, V] the student's logits, formed on demand (the losses never need them whole)."""
        return _linear_promoted(self.hidden, self.head)

    @property
    def teacher_logits(self) -> torch.Tensor:
        """[B, T, V] the teacher's logits, formed on demand."""
        with torch.no_grad():
            return _linear_promoted(self.teacher_hidden, *self.teacher_head)


def _linear_promoted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the wider of the two dtypes, e.g. outside the autocast that made w bf16."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm/Qwen2RMSNorm: normalise in fp32, scale in the input dtype."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [B, T, hd] from the teacher's rotary module."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b where a may be a (frozen, possibly bf16) teacher weight and b an fp32 projection."""
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        a = a.to(b.dtype)
    return a @ b


class _Params(nn.Module):
    """A named bag of parameters, so state-dict keys read like HF's (`layers.0.self_attn.q_proj`)."""


class LowRankClone(nn.Module):
    """A frozen teacher plus the trainable projections and student norms that generate a student.

    Trainable state (keys follow HF's state dict; each P is [d_T, d_S]):
      embed_tokens (P_emb), lm_head (P_lm, untied teachers or untie_lm_head), norm (final norm, [d_S]),
      layers.{i}.self_attn.{q,k,v,o}_proj   (attn_projection="io": in_proj, o_proj)
      layers.{i}.mlp.{gate,up,down}_proj     (ffn_projection="io": in_proj, down_proj)
      layers.{i}.{input,post_attention}_layernorm  ([d_S])
      layers.{i}.self_attn.o_align, layers.{i}.mlp.down_align  ([d_S, d_T], alignment="extra")

    Trainable parameter count, L layers:
      default ("all"/"all"/"free"): L*7*d_T*d_S + d_T*d_S*(1 if student head tied else 2) + (2L+1)*d_S
      attn_projection="io": 2 instead of 4 attention projections per layer (-2*L*d_T*d_S)
      ffn_projection="io":  2 instead of 3 FFN projections per layer     (-1*L*d_T*d_S)
      alignment="extra":    + 2*L*d_S*d_T
    """

    def __init__(self, teacher: PreTrainedModel, config: LRCConfig):
        super().__init__()
        tcfg = getattr(teacher, "config", None)
        if type(tcfg) not in SUPPORTED_CONFIGS or not isinstance(teacher, SUPPORTED_CONFIGS[type(tcfg)]):
            allowed = ", ".join(c.__name__ for c in SUPPORTED_CONFIGS.values())
            raise ValueError(f"unsupported teacher {type(teacher).__name__}; allowed: {allowed}")
        if not isinstance(config, LRCConfig):
            raise ValueError(f"config must be an LRCConfig, got {type(config).__name__}")
        d_T, d_S = tcfg.hidden_size, config.student_hidden_size
        n_heads = tcfg.num_attention_heads
        if d_S >= d_T:
            raise ValueError(f"student_hidden_size={d_S} must be smaller than the teacher's hidden_size={d_T}")
        if isinstance(tcfg, NEEDS_DIVISIBLE_HIDDEN) and d_S % n_heads != 0:
            lo, hi = (d_S // n_heads) * n_heads, (d_S // n_heads + 1) * n_heads
            raise ValueError(
                f"student_hidden_size={d_S} is not a multiple of the teacher's {n_heads} attention heads; "
                f"transformers' {type(tcfg).__name__} could not load the exported student "
                f"(use e.g. {lo or hi} or {hi})"
            )
        if "sliding_attention" in (getattr(tcfg, "layer_types", None) or []):
            raise ValueError("teachers with sliding-window attention layers are not supported")
        L = tcfg.num_hidden_layers
        self.config = config
        self.d_T, self.d_S, self.num_layers = d_T, d_S, L
        self.head_dim = getattr(tcfg, "head_dim", None) or d_T // n_heads
        self.tied = bool(getattr(tcfg, "tie_word_embeddings", False))  # the teacher's head
        self.student_tied = self.tied and not config.untie_lm_head

        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher

        def proj() -> nn.Parameter:
            return nn.Parameter(torch.empty(d_T, d_S))

        self.embed_tokens = proj()  # P_emb
        self.lm_head = None if self.student_tied else proj()  # P_lm
        self.norm = nn.Parameter(torch.ones(d_S))
        self.layers = nn.ModuleList()
        for _ in range(L):
            layer = _Params()
            layer.self_attn, layer.mlp = _Params(), _Params()
            names = ("q_proj", "k_proj", "v_proj") if config.attn_projection == "all" else ("in_proj",)
            for n in names + ("o_proj",):
                setattr(layer.self_attn, n, proj())
            names = ("gate_proj", "up_proj") if config.ffn_projection == "all" else ("in_proj",)
            for n in names + ("down_proj",):
                setattr(layer.mlp, n, proj())
            if config.alignment == "extra":
                layer.self_attn.o_align = nn.Parameter(torch.empty(d_S, d_T))
                layer.mlp.down_align = nn.Parameter(torch.empty(d_S, d_T))
            layer.input_layernorm = nn.Parameter(torch.ones(d_S))
            layer.post_attention_layernorm = nn.Parameter(torch.ones(d_S))
            self.layers.append(layer)
        self.reset_parameters()
        self.clone_layer_ids = self._resolve_clone_layers(config.clone_layers, L)
        # the teacher's activation (SiLU for Llama/Qwen2; in a tuple so nn.Module does not register it)
        self._act_fn = (teacher.model.layers[0].mlp.act_fn,)
        self._compiled_layer = None  # `_layer` through torch.compile, once compile_layers() is called

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _resolve_clone_layers(spec: Any, L: int) -> frozenset[int]:
        if spec is None:
            return frozenset(range(L))
        if isinstance(spec, (float, int)) and not isinstance(spec, (list, tuple)):
            k = max(1, round(spec * L))
            return frozenset(int(i) for i in torch.linspace(0, L - 1, k).round().long().tolist())
        bad = [i for i in spec if not 0 <= i < L]
        if bad:
            raise ValueError(f"clone_layers {bad} out of range for a teacher with {L} layers")
        return frozenset(spec)

    def reset_parameters(self) -> None:
        """The authors' init: every projection N(0, init_std), student norms 1."""
        with torch.no_grad():  # seeding is the caller's job (torch.manual_seed)
            for _, p in self.trainable_named_parameters():
                if p.ndim == 2:
                    p.normal_(0.0, self.config.init_std)
                else:
                    p.fill_(1.0)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def compile_layers(self, **options) -> "LowRankClone":
        """Run `_layer` (one decoder layer of teacher and student, with its clone terms) through
        torch.compile: regional compilation, one graph for every layer, so the elementwise work
        (norms, RoPE, SiLU, the MSEs) is fused and the per-layer Python overhead goes. The weight
        generation and the fused head stay eager. options: passed to torch.compile, over
        COMPILE_DEFAULTS (static shapes)."""
        self._compiled_layer = torch.compile(self._layer, **{**COMPILE_DEFAULTS, **options})
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters()}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self.trainable_named_parameters())

    def _projection(self, i: int, m: str) -> torch.Tensor:
        """P for weight m in {q,k,v,o,gate,up,down} of layer i, honouring IO sharing."""
        layer = self.layers[i]
        if m in ("q", "k", "v"):
            return getattr(layer.self_attn, f"{m}_proj" if self.config.attn_projection == "all" else "in_proj")
        if m == "o":
            return layer.self_attn.o_proj
        if m in ("gate", "up"):
            return getattr(layer.mlp, f"{m}_proj" if self.config.ffn_projection == "all" else "in_proj")
        return layer.mlp.down_proj

    @torch.no_grad()
    def init_from_teacher(self, calibration_ids: torch.Tensor) -> torch.Tensor | None:
        """Apply `config.init` ("prune", "prune_scaled" or "pca"; "normal" is a no-op returning
        None) from teacher statistics on calibration_ids [B, T]. Returns the kept channels [d_S]
        (prune*) or the basis U [d_T, d_S] (pca)."""
        init = self.config.init
        if init == "normal":
            return None
        if init == "pca":
            return self.init_from_pca(calibration_ids)
        return self.init_from_pruning(calibration_ids, scaled=init == "prune_scaled")

    @torch.no_grad()
    def init_from_pruning(self, calibration_ids: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """Hard-pruned start: P = one-hot selection of the d_S most important hidden channels.

        Importance of channel c = mean over tokens and over every RMSNorm output of the teacher
        (input/post-attention norms of each layer and the final norm) of |out[..., c]|
        (Minitron-style activation magnitude). Student norm weights = teacher norm weights at the
        kept channels, so `export_student()` is exactly the hard-pruned teacher; with scaled=True
        each is multiplied by its norm's c = sqrt(f * d_T / d_S) (see LRCConfig.init).
        calibration_ids: [B, T]. Returns the kept channel indices, sorted, [d_S].
        """
        stats = self.teacher_norm_statistics(calibration_ids, second_moment=scaled)
        importance = torch.stack([s["abs_out"] for s in stats.values()]).mean(0)  # [d_T]
        keep = importance.topk(self.d_S).indices.sort().values
        S = torch.zeros(self.d_T, self.d_S, device=self.norm.device)
        S[keep, torch.arange(self.d_S)] = 1.0  # [d_T, d_S] one-hot columns

        def scale(name: str) -> float:
            return self._energy_scale(stats[name]["second_moment"], S) if scaled else 1.0

        self._set_projections(out_side=S, in_side=lambda norm: S)
        tm = self.teacher.model
        self.norm.copy_(tm.norm.weight[keep] * scale("norm"))
        for i, (layer, tl) in enumerate(zip(self.layers, tm.layers)):
            for n in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, n).copy_(getattr(tl, n).weight[keep] * scale(f"layers.{i}.{n}"))
        return keep

    @torch.no_grad()
    def init_from_pca(self, calibration_ids: torch.Tensor) -> torch.Tensor:
        """SliceGPT-style start (see LRCConfig.init): returns the basis U [d_T, d_S]."""
        stats = self.teacher_norm_statistics(calibration_ids)
        C = torch.stack([s["second_moment"] for s in stats.values()]).sum(0)  # [d_T, d_T]
        evals, evecs = torch.linalg.eigh(C.double())  # ascending
        U = evecs[:, -self.d_S:].flip(-1)  # [d_T, d_S], largest first
        U = U * torch.sign(U[U.abs().argmax(0), torch.arange(self.d_S)])  # deterministic signs
        U = U.to(self.norm.dtype)
        tm = self.teacher.model

        def in_side(norm: str) -> torch.Tensor:  # c * diag(gamma) @ U: [d_T, d_S]
            gamma = self.teacher.get_submodule(f"model.{norm}").weight.float()
            return self._energy_scale(stats[norm]["second_moment"], U) * gamma[:, None] * U

        self._set_projections(out_side=U, in_side=in_side)
        for layer in self.layers:
            layer.input_layernorm.fill_(1.0)
            layer.post_attention_layernorm.fill_(1.0)
        if self.student_tied:  # least-squares diagonal for gamma_final in the rotated basis
            c = self._energy_scale(stats["norm"]["second_moment"], U)
            self.norm.copy_(c * (tm.norm.weight.float()[:, None] * U * U).sum(0))
        else:  # P_lm = in_side("norm") absorbs gamma_final (set by _set_projections)
            self.norm.fill_(1.0)
        return U

    def _set_projections(self, out_side: torch.Tensor, in_side) -> None:
        """P_emb, P_o, P_down (and extra alignment, transposed) = out_side [d_T, d_S]; each
        input-side P = in_side(<name of the RMSNorm that feeds it>); P_lm = in_side("norm")."""
        self.embed_tokens.copy_(out_side)
        if self.lm_head is not None:
            self.lm_head.copy_(in_side("norm"))
        for i, layer in enumerate(self.layers):
            for mod, norm in ((layer.self_attn, "input_layernorm"), (layer.mlp, "post_attention_layernorm")):
                for name, p in mod.named_parameters():
                    if name in ("o_proj", "down_proj"):
                        p.copy_(out_side)
                    elif name in ("o_align", "down_align"):
                        p.copy_(out_side.T)  # [d_S, d_T]: maps the student output back
                    else:  # q/k/v/gate/up/in_proj
                        p.copy_(in_side(f"layers.{i}.{norm}"))

    def _energy_scale(self, second_moment: torch.Tensor, P: torch.Tensor) -> float:
        """c = sqrt(f * d_T / d_S), f = E||x_hat P||^2 = tr(P^T M P) for M = E[x_hat^T x_hat]."""
        f = torch.einsum("ij,ik,kj->", P.double(), second_moment.double(), P.double()).item()
        return math.sqrt(max(f, 1e-12) * self.d_T / self.d_S)

    @torch.no_grad()
    def teacher_norm_statistics(self, input_ids: torch.Tensor,
                                second_moment: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """One teacher forward on input_ids [B, T]; per RMSNorm (keys "norm",
        "layers.{i}.input_layernorm", "layers.{i}.post_attention_layernorm"):
          abs_out:       mean |output| per channel [d_T]
          second_moment: E[x_hat^T x_hat] of the unit-norm input x_hat = x / ||x|| [d_T, d_T]
                         (only when second_moment=True: an N x d_T x d_T product per norm)
        """
        input_ids = input_ids.to(self.norm.device)
        tm = self.teacher.model
        names = ["norm"] + [f"layers.{i}.{n}" for i in range(self.num_layers)
                            for n in ("input_layernorm", "post_attention_layernorm")]
        stats = {}

        def hook(name):
            def fn(_m, inp, out):
                stats[name] = {"abs_out": out.detach().float().abs().reshape(-1, self.d_T).mean(0)}
                if second_moment:
                    x = inp[0].detach().float().reshape(-1, self.d_T)  # [N, d_T]
                    xh = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    stats[name]["second_moment"] = xh.T @ xh / x.shape[0]  # [d_T, d_T]
            return fn

        handles = [tm.get_submodule(n).register_forward_hook(hook(n)) for n in names]
        try:
            self.teacher(input_ids=input_ids)
        finally:
            for h in handles:
                h.remove()
        assert set(stats) == set(names), sorted(set(names) - set(stats))
        return stats

    # ------------------------------------------------------------------ weight generation
    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The teacher's matrices (embedding, LM head, every linear weight), keyed by HF names.

        Under autocast they are cast to the autocast dtype here, once per step, and shared by the
        teacher's forward and the weight generation: autocast casts frozen weights on every use
        (its cast cache only holds trainable leaves), so each would otherwise be cast twice.
        """
        device = self.norm.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        TW = {n: p if dtype is None or not p.is_floating_point() else p.to(dtype)
              for n, p in self.teacher.named_parameters() if p.ndim == 2}
        if self.tied:
            TW["lm_head.weight"] = TW["model.embed_tokens.weight"]
        return TW

    def student_weights(self, teacher_weights: dict[str, torch.Tensor] | None = None,
                        device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Generate every student weight from the teacher's, keyed by HF state-dict names.

        teacher_weights: `self.teacher_weights()` when the caller already has them.
        device: generate there (every input copied over; default: where the parameters are).
        """
        tm = self.teacher.model
        TW = self.teacher_weights() if teacher_weights is None else teacher_weights
        on = (lambda t: t) if device is None else (lambda t: t.to(device))  # noqa: E731
        W: dict[str, torch.Tensor] = {}
        E_T = on(TW["model.embed_tokens.weight"])  # [V, d_T]
        W["model.embed_tokens.weight"] = _matmul(E_T, on(self.embed_tokens))  # [V, d_S]
        if not self.student_tied:
            W["lm_head.weight"] = _matmul(on(TW["lm_head.weight"]), on(self.lm_head))  # [V, d_S]
        W["model.norm.weight"] = on(self.norm)
        for i, (layer, tl) in enumerate(zip(self.layers, tm.layers)):
            pre = f"model.layers.{i}."
            sa, mlp = tl.self_attn, tl.mlp
            for m, lin in (("q", sa.q_proj), ("k", sa.k_proj), ("v", sa.v_proj)):
                W_T = on(TW[pre + f"self_attn.{m}_proj.weight"])  # [out, d_T]
                W[pre + f"self_attn.{m}_proj.weight"] = _matmul(W_T, on(self._projection(i, m)))  # [out, d_S]
                if lin.bias is not None:
                    W[pre + f"self_attn.{m}_proj.bias"] = on(lin.bias)  # kept: size is not d_T
            for m, lin in (("gate", mlp.gate_proj), ("up", mlp.up_proj)):
                W_T = on(TW[pre + f"mlp.{m}_proj.weight"])  # [d_mid, d_T]
                W[pre + f"mlp.{m}_proj.weight"] = _matmul(W_T, on(self._projection(i, m)))  # [d_mid, d_S]
                if lin.bias is not None:
                    W[pre + f"mlp.{m}_proj.bias"] = on(lin.bias)
            for key, lin, P in (("self_attn.o_proj", sa.o_proj, on(layer.self_attn.o_proj)),
                                ("mlp.down_proj", mlp.down_proj, on(layer.mlp.down_proj))):
                W[pre + key + ".weight"] = _matmul(on(TW[pre + key + ".weight"]).T, P).T  # P^T W: [d_S, in]
                if lin.bias is not None:
                    W[pre + key + ".bias"] = _matmul(on(lin.bias)[None], P)[0]  # b P: [d_S]
            W[pre + "input_layernorm.weight"] = on(layer.input_layernorm)
            W[pre + "post_attention_layernorm.weight"] = on(layer.post_attention_layernorm)
        return W

    # ------------------------------------------------------------------ forward
    def _attention(self, q, k, v, cos, sin):
        """q: [B, T, nH*hd], k/v: [B, T, nKV*hd] (pre-RoPE) -> attention output [B, T, nH*hd]."""
        B, T, _ = q.shape
        hd = self.head_dim
        q = apply_rope(q.view(B, T, -1, hd).transpose(1, 2), cos, sin)  # [B, nH, T, hd]
        k = apply_rope(k.view(B, T, -1, hd).transpose(1, 2), cos, sin)  # [B, nKV, T, hd]
        v = v.view(B, T, -1, hd).transpose(1, 2)  # [B, nKV, T, hd]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=q.shape[1] != k.shape[1]
        )  # [B, nH, T, hd]
        return out.transpose(1, 2).reshape(B, T, -1)  # [B, T, nH*hd]

    def _layer_weights(self, i: int, TW: dict[str, torch.Tensor], W: dict[str, torch.Tensor]):
        """Layer i's tensors for `_layer`: (teacher, student, projections), keyed without the
        `model.layers.{i}.` prefix; a linear is (weight, bias or None), a norm its weight."""
        pre, tl, layer = f"model.layers.{i}.", self.teacher.model.layers[i], self.layers[i]
        teacher = {n: (TW[pre + n + ".weight"], tl.get_submodule(n).bias) for n in LINEARS}
        student = {n: (W[pre + n + ".weight"], W.get(pre + n + ".bias")) for n in LINEARS}
        for n in NORMS:
            teacher[n], student[n] = tl.get_submodule(n).weight, W[pre + n + ".weight"]
        P = {"q": self._projection(i, "q"), "gate": self._projection(i, "gate"),
             "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj,
             "o_align": getattr(layer.self_attn, "o_align", None), "down_align": getattr(layer.mlp, "down_align", None)}
        return teacher, student, P

    def _layer(self, terms: tuple[str, ...], x_t: torch.Tensor, x_s: torch.Tensor, rope_t, rope_s,
               teacher: dict, student: dict, P: dict[str, torch.Tensor | None]):
        """One decoder layer of the teacher (no grad) and the student side by side.

        x_t: [B, T, d_T], x_s: [B, T, d_S] residual streams; rope_t/rope_s: (cos, sin) [B, T, hd] in
        each side's dtype; terms: the clone terms on in this layer; teacher, student, P: from
        `_layer_weights`. Returns the next residual streams and {term: E(student, target)}.
        Free of the layer index, so `compile_layers` compiles one graph that serves every layer.
        """
        cfg, eps, act = self.config, self.teacher.config.rms_norm_eps, self._act_fn[0]
        relative = cfg.clone_normalize == "relative"
        mses: dict[str, torch.Tensor] = {}

        def add(term: str, student_out: torch.Tensor, target: torch.Tensor) -> None:
            if term in terms:
                mses[term] = clone_mse(student_out, target, relative)

        def add_output(term: str, out_s: torch.Tensor, out_t: torch.Tensor) -> None:
            """o / down: a block's output [B, T, d_S] against the teacher's [B, T, d_T], in the
            student's space (out^T P, through the projection that generates the student's o_proj /
            down_proj: the paper) or, with alignment="extra", in the teacher's (out^S A)."""
            if cfg.alignment == "extra":
                add(term, out_s @ P[term + "_align"], out_t)  # [B, T, d_T]
            else:
                t = _matmul(out_t, P[term])  # [B, T, d_S]
                add(term, out_s, t.detach() if cfg.detach_targets else t)

        def s_lin(name: str, x: torch.Tensor) -> torch.Tensor:  # the student's linear `name`
            return F.linear(x, *student[name])

        def t_lin(name: str, x: torch.Tensor) -> torch.Tensor:  # the teacher's linear `name`
            return F.linear(x, *teacher[name])

        # ---- attention
        with torch.no_grad():
            hn_t = rms_norm(x_t, teacher["input_layernorm"], eps)  # [B, T, d_T]
            q_t = t_lin("self_attn.q_proj", hn_t)  # [B, T, nH*hd]
            k_t = t_lin("self_attn.k_proj", hn_t)  # [B, T, nKV*hd]
            v_t = t_lin("self_attn.v_proj", hn_t)
            a_t = self._attention(q_t, k_t, v_t, *rope_t)  # [B, T, nH*hd]
            o_t = t_lin("self_attn.o_proj", a_t)  # [B, T, d_T]
        hn_s = rms_norm(x_s, student["input_layernorm"], eps)  # [B, T, d_S]
        q_s = s_lin("self_attn.q_proj", hn_s)  # [B, T, nH*hd]
        k_s = s_lin("self_attn.k_proj", hn_s)  # [B, T, nKV*hd]
        v_s = s_lin("self_attn.v_proj", hn_s)
        a_s = self._attention(q_s, k_s, v_s, *rope_s)  # [B, T, nH*hd]
        o_s = s_lin("self_attn.o_proj", a_s)  # [B, T, d_S]
        add("q", q_s, q_t)
        add("k", k_s, k_t)
        add("v", v_s, v_t)
        if "attn_in" in terms:
            add("attn_in", _matmul(hn_s, P["q"].T), hn_t)  # [B, T, d_T]
        if "o" in terms:
            if cfg.attn_out_space == "teacher":  # o_proj^T(attn^S) vs o^T [B, T, d_T]
                add("o", t_lin("self_attn.o_proj", a_s), o_t)
            else:
                add_output("o", o_s, o_t)
        x_t = x_t + o_t
        x_s = x_s + o_s

        # ---- FFN
        with torch.no_grad():
            hn_t = rms_norm(x_t, teacher["post_attention_layernorm"], eps)  # [B, T, d_T]
            g_t, u_t = t_lin("mlp.gate_proj", hn_t), t_lin("mlp.up_proj", hn_t)  # [B, T, d_mid]
            f_t = t_lin("mlp.down_proj", act(g_t) * u_t)  # [B, T, d_T]
        hn_s = rms_norm(x_s, student["post_attention_layernorm"], eps)  # [B, T, d_S]
        g_s, u_s = s_lin("mlp.gate_proj", hn_s), s_lin("mlp.up_proj", hn_s)  # [B, T, d_mid]
        f_s = s_lin("mlp.down_proj", act(g_s) * u_s)  # [B, T, d_S]
        add("gate", g_s, g_t)
        add("up", u_s, u_t)
        if "ffn_in" in terms:
            add("ffn_in", _matmul(hn_s, P["gate"].T), hn_t)  # [B, T, d_T]
        if "down" in terms:
            add_output("down", f_s, f_t)
        return x_t + f_t, x_s + f_s, mses

    def clone(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
              weights: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> CloneOutput:
        """Run teacher and student side by side on input_ids [B, T]; labels [B, T] (default:
        input_ids; -100 = ignored) for the LM loss.

        weights: (teacher_weights(), student_weights(...)) generated once by the caller and reused
            (see `lrc_src.baselines.LRCMethod.accumulation_window`); default: generate them here.
        `.losses` holds scalars "kl", "lm" (detached values, always reported; in `.loss` only when use_kl/use_lm),
        "clone" and one "clone/<term>" per enabled term (summed over layers).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids
        elif labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        cfg, tm, eps = self.config, self.teacher.model, self.teacher.config.rms_norm_eps
        if weights is None:
            TW = self.teacher_weights()  # cast once (autocast), shared by teacher forward and generation
            W = self.student_weights(TW)
        else:
            TW, W = weights
        B, T = input_ids.shape
        per_term: dict[str, list[torch.Tensor]] = {t: [] for t in cfg.clone_terms}

        position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        with torch.no_grad():
            x_t = tm.embed_tokens(input_ids)  # [B, T, d_T]
            cos, sin = tm.rotary_emb(x_t, position_ids)  # [B, T, hd]: the teacher's own RoPE
        x_s = F.embedding(input_ids, W["model.embed_tokens.weight"])  # [B, T, d_S]
        rope_t, rope_s = (cos, sin), (cos.to(x_s.dtype), sin.to(x_s.dtype))
        all_terms, layer_fn = tuple(cfg.clone_terms), self._compiled_layer or self._layer
        for i in range(self.num_layers):
            terms = all_terms if i in self.clone_layer_ids else ()
            x_t, x_s, mses = layer_fn(terms, x_t, x_s, rope_t, rope_s, *self._layer_weights(i, TW, W))
            for t, v in mses.items():
                per_term[t].append(v)

        with torch.no_grad():
            h_t = tm.norm(x_t)  # [B, T, d_T]
        head = W["lm_head.weight"] if not self.student_tied else W["model.embed_tokens.weight"]  # [V, d_S]
        h_s = rms_norm(x_s, W["model.norm.weight"], eps)  # [B, T, d_S]
        # logits = h_s head^T and teacher_logits = h_t lm_head^T are never formed at [B, T, V]:
        # head_losses takes the KL and LM loss chunk by chunk (CloneOutput.logits forms them on demand)
        head_loss, losses = head_losses(
            h_s, head, labels, (h_t, TW["lm_head.weight"], self.teacher.lm_head.bias),
            temperature=cfg.kl_temperature, reduction=cfg.kl_reduction,
            kl_weight=float(cfg.use_kl), lm_weight=float(cfg.use_lm),
        )
        zero = h_s.new_zeros((), dtype=torch.float32)
        for t, vals in per_term.items():
            losses[f"clone/{t}"] = torch.stack(vals).sum() if vals else zero
        n_terms = sum(len(v) for v in per_term.values())
        clone = sum((losses[f"clone/{t}"] for t in per_term), zero)
        if cfg.clone_reduction == "mean" and n_terms:
            clone = clone / n_terms
        losses["clone"] = clone
        loss = cfg.alpha * clone + head_loss  # + KL and LM as switched on (use_kl, use_lm)
        return CloneOutput(loss=loss, losses=losses, hidden=h_s, head=head, teacher_hidden=h_t,
                           teacher_head=(TW["lm_head.weight"], self.teacher.lm_head.bias))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CloneOutput:
        return self.clone(input_ids, labels)

    # ------------------------------------------------------------------ export
    def student_config(self):
        """The teacher's config with hidden_size = d_S and head_dim set explicitly."""
        tcfg = self.teacher.config
        d = tcfg.to_dict()
        for k in ("_name_or_path", "quantization_config", "architectures", "transformers_version",
                  "_attn_implementation_autoset", "dtype", "torch_dtype"):
            d.pop(k, None)
        d.update(hidden_size=self.d_S, head_dim=self.head_dim, tie_word_embeddings=self.student_tied)
        return type(tcfg)(**d)

    @torch.no_grad()
    def export_student(self, device: str | torch.device | None = None) -> PreTrainedModel:
        """Materialise the student once into a plain transformers model of the teacher's class.

        device: where to generate its weights and put it (default: where the projections are).
        """
        scfg = self.student_config()
        model_cls = SUPPORTED_CONFIGS[type(scfg)]
        device = self.norm.device if device is None else torch.device(device)
        student = model_cls(scfg).to(device)
        W = {k: v.detach().float().contiguous() for k, v in self.student_weights(device=device).items()}
        if self.student_tied:
            W["lm_head.weight"] = W["model.embed_tokens.weight"]
        missing, unexpected = student.load_state_dict(W, strict=False)
        assert not unexpected, unexpected
        assert all(k == "lm_head.weight" for k in missing), missing  # tied head
        if self.student_tied:
            student.tie_weights()
        student.eval()
        return student

    def save_student(self, directory: str | Path, tokenizer=None) -> Path:
        """Write the exported student (safetensors + config, + tokenizer) to `directory`.

        Its weights are generated on the CPU whatever device trained the projections: GPU and CPU
        matmuls round differently, and a saved student must not depend on where it was saved (the
        end of a GPU run and `lrc export` of its checkpoint on a laptop write the same file).
        """
        directory = Path(directory)
        student = self.export_student(device="cpu")
        student.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory
