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

Variants (all configuration, see `LRCConfig`), each chosen once when the model is built: IO
sharing of one P across q,k,v and/or gate,up (`BlockProjections`); which pair each clone term
compares (`CloneTerm`: extra alignment matrices for "w/o Alignment-Free", the attention-output term
in the teacher space as in the authors' code); dropped clone terms or layers; KL temperature and
reduction; the start (`lrc_src.starts`).

The teacher and student run side by side, layer by layer, in one functional forward that mirrors
transformers' `modeling_llama.py` (RMSNorm in fp32, RoPE from the teacher's own rotary module,
SDPA causal attention). `export_student()` (`lrc_src.export`) materialises the weights once into a
plain `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` whose logits equal
`clone().logits`.

Contents, in order: settings (`LRCConfig`, kept torch-free in `lrc_src.config`); functional
pieces (norm, RoPE, attention, the two blocks); trainable parameters (`BlockProjections`,
`LayerProjections`); clone terms (`CloneTerm`); `LowRankClone`: parameters, weight generation, the
layer, the loss; export delegates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from lrc_src import export, starts
from lrc_src.config import LRCConfig
from lrc_src.export import SUPPORTED_CONFIGS, attention_window, check_student_size, head_dim
from lrc_src.losses import clone_mse, compiled_head_for, head_losses
from lrc_src.runtime import COMPILE_DEFAULTS

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NORMS = ("input_layernorm", "post_attention_layernorm")


# ====================================================================== settings
# LRCConfig, the method's settings with the paper's defaults, is in lrc_src/config.py: torch-free,
# like transformers' configuration_*.py, so that reading a run's config does not load torch.


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


# ====================================================================== functional pieces
def _linear_promoted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the wider of the two dtypes, e.g. outside the autocast that made w bf16."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b where a may be a (frozen, possibly bf16) teacher weight and b an fp32 projection."""
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        a = a.to(b.dtype)
    return a @ b


def _like(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A frozen teacher tensor (a bf16 teacher's bias) in the dtype of the generated weight it goes
    with; under autocast every op casts for itself."""
    if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
        t = t.to(weight.dtype)
    return t


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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hd: int
) -> torch.Tensor:
    """q: [B, T, nH*hd], k/v: [B, T, nKV*hd] (pre-RoPE) -> causal attention output [B, T, nH*hd]."""
    B, T, _ = q.shape
    q = apply_rope(q.view(B, T, -1, hd).transpose(1, 2), cos, sin)  # [B, nH, T, hd]
    k = apply_rope(k.view(B, T, -1, hd).transpose(1, 2), cos, sin)  # [B, nKV, T, hd]
    v = v.view(B, T, -1, hd).transpose(1, 2)  # [B, nKV, T, hd]
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=q.shape[1] != k.shape[1]
    )  # [B, nH, T, hd]
    return out.transpose(1, 2).reshape(B, T, -1)  # [B, T, nH*hd]


# A layer's tensors of one side (teacher or student), keyed without the `model.layers.{i}.` prefix:
# a linear (LINEARS) is (weight, bias or None), a norm (NORMS) its weight.
LayerTensors = dict[str, Any]


def self_attention_block(
    x: torch.Tensor, w: LayerTensors, rope: tuple[torch.Tensor, torch.Tensor], eps: float, hd: int
) -> dict[str, torch.Tensor]:
    """The pre-norm attention block of one side; x: [B, T, d] residual stream. Returns its
    activations: in (normed input) [B, T, d], q [B, T, nH*hd], k, v [B, T, nKV*hd] (raw linear
    outputs, before RoPE), attn [B, T, nH*hd] (o_proj's input), o [B, T, d] (o_proj's output)."""
    h = rms_norm(x, w["input_layernorm"], eps)
    q = F.linear(h, *w["self_attn.q_proj"])
    k = F.linear(h, *w["self_attn.k_proj"])
    v = F.linear(h, *w["self_attn.v_proj"])
    a = attention(q, k, v, *rope, hd)
    return {"in": h, "q": q, "k": k, "v": v, "attn": a, "o": F.linear(a, *w["self_attn.o_proj"])}


def mlp_block(x: torch.Tensor, w: LayerTensors, act: Callable, eps: float) -> dict[str, torch.Tensor]:
    """The pre-norm gated FFN block of one side; x: [B, T, d]. Returns its activations: in (normed
    input) [B, T, d], gate (before the activation), up [B, T, d_mid], down [B, T, d] (the output)."""
    h = rms_norm(x, w["post_attention_layernorm"], eps)
    g, u = F.linear(h, *w["mlp.gate_proj"]), F.linear(h, *w["mlp.up_proj"])
    return {"in": h, "gate": g, "up": u, "down": F.linear(act(g) * u, *w["mlp.down_proj"])}


# ====================================================================== trainable parameters
class BlockProjections(nn.Module):
    """The projections of one block, each [d_T, d_S], named like the HF linears they generate.

    inputs: the block's input-side weights (("q", "k", "v") or ("gate", "up")); output: its output
    weight ("o" or "down"). Parameters: {m}_proj for each input and {output}_proj; shared=True
    (the "io" variant) has one in_proj for every input instead; aligned=True (alignment="extra")
    adds {output}_align [d_S, d_T]. `block[m]` is P_m.
    """

    def __init__(self, inputs: tuple[str, ...], output: str, d_T: int, d_S: int, shared: bool, aligned: bool):
        super().__init__()
        self.param_of = {m: "in_proj" if shared else f"{m}_proj" for m in inputs}
        self.param_of[output] = f"{output}_proj"
        for name in dict.fromkeys(self.param_of.values()):
            setattr(self, name, nn.Parameter(torch.empty(d_T, d_S)))
        if aligned:
            setattr(self, f"{output}_align", nn.Parameter(torch.empty(d_S, d_T)))

    def __getitem__(self, m: str) -> nn.Parameter:
        return getattr(self, self.param_of[m])


class LayerProjections(nn.Module):
    """A layer's trainable state: self_attn, mlp (`BlockProjections`) and the student's RMSNorm
    weights input_layernorm, post_attention_layernorm [d_S]."""

    def __init__(self, d_T: int, d_S: int, config: LRCConfig):
        super().__init__()
        aligned = config.alignment == "extra"
        self.self_attn = BlockProjections(("q", "k", "v"), "o", d_T, d_S, config.attn_projection == "io", aligned)
        self.mlp = BlockProjections(("gate", "up"), "down", d_T, d_S, config.ffn_projection == "io", aligned)
        self.input_layernorm = nn.Parameter(torch.ones(d_S))
        self.post_attention_layernorm = nn.Parameter(torch.ones(d_S))


# ====================================================================== clone terms (Eq. 7-8)
class CloneTerm:
    """One term E(student, target) of the clone loss, taken after its block.

    `pair(s, t, teacher, P)` picks (student, target) from the block's activations s (student) and
    t (teacher, no grad; see `self_attention_block` / `mlp_block`), the teacher's layer tensors
    and the layer's projections P ({"q", "gate", "o", "down", "o_align", "down_align"}).
    """

    def __init__(self, name: str):
        self.name = name  # reported as "clone/<name>"

    def pair(self, s: dict, t: dict, teacher: LayerTensors, P: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Activation(CloneTerm):
    """Eq. 7: E(h^S_m, h^T_m), the raw outputs of linear m in q, k, v, gate, up."""

    def pair(self, s, t, teacher, P):
        return s[self.name], t[self.name]


class SharedInput(CloneTerm):
    """IO sharing (attn_in, ffn_in): E(x^S P^T, x^T) of the block's normed input [B, T, d_T],
    through the one P its inputs share (P[projection], "q" or "gate")."""

    def __init__(self, name: str, projection: str):
        super().__init__(name)
        self.projection = projection

    def pair(self, s, t, teacher, P):
        return _matmul(s["in"], P[self.projection].T), t["in"]  # [B, T, d_T]


class ProjectedOutput(CloneTerm):
    """Eq. 8 (o, down): E(o^S, o^T P), the block's output [B, T, d_S] against the teacher's
    projected into the student's space through the P that generates the student's o_proj /
    down_proj. detach: no gradient through the target (LRCConfig.detach_targets)."""

    def __init__(self, name: str, detach: bool):
        super().__init__(name)
        self.detach = detach

    def pair(self, s, t, teacher, P):
        target = _matmul(t[self.name], P[self.name])  # [B, T, d_S]
        return s[self.name], target.detach() if self.detach else target


class AlignedOutput(CloneTerm):
    """alignment="extra" (o, down): E(o^S A, o^T) in the teacher's space [B, T, d_T], through an
    extra trainable A = P[<name>_align] [d_S, d_T] (the "w/o Alignment-Free" ablation)."""

    def pair(self, s, t, teacher, P):
        return s[self.name] @ P[self.name + "_align"], t[self.name]  # [B, T, d_T]


class TeacherSpaceAttentionOutput(CloneTerm):
    """attn_out_space="teacher" (o): E(o_proj^T(attn^S), o^T) [B, T, d_T] (the authors' code)."""

    def pair(self, s, t, teacher, P):
        return F.linear(s["attn"], *teacher["self_attn.o_proj"]), t["o"]


def clone_terms(config: LRCConfig) -> tuple[tuple[CloneTerm, ...], tuple[CloneTerm, ...]]:
    """The enabled clone terms of the attention and of the FFN block, in the order they are taken."""

    def output(name: str) -> CloneTerm:
        return AlignedOutput(name) if config.alignment == "extra" else ProjectedOutput(name, config.detach_targets)

    if config.attn_projection == "all":
        attn = [Activation("q"), Activation("k"), Activation("v")]
    else:
        attn = [SharedInput("attn_in", "q")]
    attn.append(TeacherSpaceAttentionOutput("o") if config.attn_out_space == "teacher" else output("o"))
    if config.ffn_projection == "all":
        ffn = [Activation("gate"), Activation("up")]
    else:
        ffn = [SharedInput("ffn_in", "gate")]
    ffn.append(output("down"))
    on = set(config.clone_terms)
    return tuple(t for t in attn if t.name in on), tuple(t for t in ffn if t.name in on)


NO_TERMS: tuple[tuple[CloneTerm, ...], tuple[CloneTerm, ...]] = ((), ())  # a layer without clone loss


def resolve_clone_layers(spec: Any, L: int) -> frozenset[int]:
    """LRCConfig.clone_layers -> the indices of the layers with a clone loss."""
    if spec is None:
        return frozenset(range(L))
    if isinstance(spec, (float, int)):
        k = max(1, round(spec * L))
        return frozenset(int(i) for i in torch.linspace(0, L - 1, k).round().long().tolist())
    bad = [i for i in spec if not 0 <= i < L]
    if bad:
        raise ValueError(f"clone_layers {bad} out of range for a teacher with {L} layers")
    return frozenset(spec)


# ====================================================================== the model
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
        d_T, d_S, L = tcfg.hidden_size, config.student_hidden_size, tcfg.num_hidden_layers
        check_student_size(tcfg, d_S)
        self.config = config
        self.d_T, self.d_S, self.num_layers = d_T, d_S, L
        self.head_dim, self.eps = head_dim(tcfg), tcfg.rms_norm_eps
        self.teacher_tied = bool(getattr(tcfg, "tie_word_embeddings", False))
        self.student_tied = self.teacher_tied and not config.untie_lm_head
        self.sliding_window = attention_window(tcfg)  # longest sequence cloned exactly (None: any)

        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        # the teacher's activation (SiLU for Llama/Qwen2; in a tuple so nn.Module does not register it)
        self._act_fn = (teacher.model.layers[0].mlp.act_fn,)

        self.embed_tokens = nn.Parameter(torch.empty(d_T, d_S))  # P_emb
        self.lm_head = None if self.student_tied else nn.Parameter(torch.empty(d_T, d_S))  # P_lm
        self.norm = nn.Parameter(torch.ones(d_S))
        self.layers = nn.ModuleList(LayerProjections(d_T, d_S, config) for _ in range(L))
        self.reset_parameters()

        self.terms = clone_terms(config)  # (attention terms, FFN terms) of a layer with clone loss
        self.clone_layer_ids = resolve_clone_layers(config.clone_layers, L)
        self.relative_mse = config.clone_normalize == "relative"
        self._compiled_layer = None  # `_layer` through torch.compile, once compile_layers() is called
        self._head_chunk = None  # the head's per-chunk fp32 work compiled (compile_layers); None: eager
        self._window: dict | None = None  # the weights generated once, inside accumulation_window()

    def check_length(self, T: int) -> None:
        """ValueError if sequences of T tokens pass the teacher's sliding attention window: LRC's
        attention is full causal, the teacher's own only up to the window."""
        if self.sliding_window is not None and T > self.sliding_window:
            raise ValueError(
                f"sequences of {T} tokens are longer than the teacher's sliding_window={self.sliding_window}, "
                f"which LRC's full causal attention does not reproduce; use at most {self.sliding_window}"
            )

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """The authors' init: every projection N(0, init_std), student norms 1."""
        with torch.no_grad():  # seeding is the caller's job (torch.manual_seed)
            for _, p in self.trainable_named_parameters():
                if p.ndim == 2:
                    p.normal_(0.0, self.config.init_std)
                else:
                    p.fill_(1.0)

    def init_from_teacher(self, calibration_ids: torch.Tensor) -> torch.Tensor | None:
        """Apply config.init from teacher statistics on calibration_ids [B, T] (`lrc_src.starts`)."""
        return starts.init_from_teacher(self, calibration_ids)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters()}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self.trainable_named_parameters())

    def compile_layers(self, head: bool | None = None, **options) -> LowRankClone:
        """Run `_layer` (one decoder layer of teacher and student, with its clone terms) through
        torch.compile: regional compilation, one graph for every layer, so the elementwise work
        (norms, RoPE, SiLU, the MSEs) is fused and the per-layer Python overhead goes. The weight
        generation and the head's matmuls stay eager.

        head: compile the head's per-chunk softmax / KL / gradient work too
        (`losses.compiled_head_chunk_losses`); None: where the parameters are on CUDA
        (`losses.compiles_head`).
        options: passed to torch.compile, over COMPILE_DEFAULTS (static shapes)."""
        self._compiled_layer = torch.compile(self._layer, **{**COMPILE_DEFAULTS, **options})
        self._head_chunk = compiled_head_for(self.norm.device, head, **options)
        return self

    # ------------------------------------------------------------------ weight generation (Eq. 3-5)
    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The teacher's matrices (embedding, LM head, every linear weight), keyed by HF names.

        Under autocast they are cast to the autocast dtype here, once per step, and shared by the
        teacher's forward and the weight generation: autocast casts frozen weights on every use
        (its cast cache only holds trainable leaves), so each would otherwise be cast twice.
        """
        device = self.norm.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        TW = {
            n: p if dtype is None or not p.is_floating_point() else p.to(dtype)
            for n, p in self.teacher.named_parameters()
            if p.ndim == 2
        }
        if self.teacher_tied:
            TW["lm_head.weight"] = TW["model.embed_tokens.weight"]
        return TW

    def student_weights(
        self, teacher_weights: dict[str, torch.Tensor] | None = None, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Generate every student weight from the teacher's, keyed by HF state-dict names.

        teacher_weights: `self.teacher_weights()` when the caller already has them.
        device: generate there (every input copied over; default: where the parameters are).
        """
        tm = self.teacher.model
        TW = self.teacher_weights() if teacher_weights is None else teacher_weights
        on = (lambda t: t) if device is None else (lambda t: t.to(device))
        W: dict[str, torch.Tensor] = {}
        E_T = on(TW["model.embed_tokens.weight"])  # [V, d_T]
        W["model.embed_tokens.weight"] = _matmul(E_T, on(self.embed_tokens))  # [V, d_S]
        if not self.student_tied:
            W["lm_head.weight"] = _matmul(on(TW["lm_head.weight"]), on(self.lm_head))  # [V, d_S]
        W["model.norm.weight"] = on(self.norm)
        for i, (layer, tl) in enumerate(zip(self.layers, tm.layers)):
            pre = f"model.layers.{i}."
            for block, m in (
                ("self_attn", "q"),
                ("self_attn", "k"),
                ("self_attn", "v"),
                ("mlp", "gate"),
                ("mlp", "up"),
            ):
                key = f"{block}.{m}_proj"
                W_T = on(TW[pre + key + ".weight"])  # [out, d_T]
                W[pre + key + ".weight"] = _matmul(W_T, on(layer.get_submodule(block)[m]))  # [out, d_S]
                if (bias := tl.get_submodule(key).bias) is not None:  # kept: its size is not d_T
                    W[pre + key + ".bias"] = _like(on(bias), W[pre + key + ".weight"])
            for key, P in (
                ("self_attn.o_proj", on(layer.self_attn.o_proj)),
                ("mlp.down_proj", on(layer.mlp.down_proj)),
            ):
                W[pre + key + ".weight"] = _matmul(on(TW[pre + key + ".weight"]).T, P).T  # P^T W: [d_S, in]
                if (bias := tl.get_submodule(key).bias) is not None:
                    W[pre + key + ".bias"] = _matmul(on(bias)[None], P)[0]  # b P: [d_S]
            W[pre + "input_layernorm.weight"] = on(layer.input_layernorm)
            W[pre + "post_attention_layernorm.weight"] = on(layer.post_attention_layernorm)
        return W

    @contextlib.contextmanager
    def accumulation_window(self):
        """Generate the student's weights once for all micro-batches of an optimizer step.

        Inside the window, every forward uses the same generated weights as detached leaves
        W'; each backward accumulates dL/dW' there (and the projections' direct gradients, e.g.
        through the clone targets o^T_attn P_o, into P.grad as usual). On exit, one backward through
        the generation, W = W_T P, turns the summed dL/dW' into P.grad. The gradients equal those
        of generating per micro-batch (tested); the generation's forward and backward run once
        per optimizer step instead of once per micro-batch. Under DDP the trainer runs every
        micro-batch without DDP's gradient sync and averages the gradients itself after this
        backward (`lrc_src.step.average_gradients`).
        """
        assert self._window is None, "nested accumulation windows"
        self._window = {}
        try:
            yield self
            win = self._window
            if win:
                keys = [k for k, leaf in win["leaves"].items() if leaf.grad is not None]
                if keys:
                    torch.autograd.backward([win["W"][k] for k in keys], [win["leaves"][k].grad for k in keys])
        finally:
            self._window = None

    def generated_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(teacher_weights(), student_weights()) for one forward: generated here, or inside
        `accumulation_window()` by the window's first forward, then reused as detached leaves."""
        if self._window is None:
            TW = self.teacher_weights()  # cast once (autocast), shared by teacher forward and generation
            return TW, self.student_weights(TW)
        if not self._window:  # first micro-batch: generate under the caller's autocast
            TW = self.teacher_weights()
            W = self.student_weights(TW)  # in the graph of the projections
            leaves = {k: w.detach().requires_grad_() for k, w in W.items() if w.grad_fn is not None}
            self._window.update(TW=TW, W=W, leaves=leaves)
        win = self._window
        return win["TW"], {**win["W"], **win["leaves"]}

    # ------------------------------------------------------------------ the layer
    def _layer_weights(
        self, i: int, TW: dict[str, torch.Tensor], W: dict[str, torch.Tensor]
    ) -> tuple[LayerTensors, LayerTensors, dict[str, torch.Tensor | None]]:
        """Layer i's tensors for `_layer`: (teacher, student: LayerTensors, projections P)."""
        pre, tl, layer = f"model.layers.{i}.", self.teacher.model.layers[i], self.layers[i]
        teacher = {n: (TW[pre + n + ".weight"], tl.get_submodule(n).bias) for n in LINEARS}
        student = {n: (W[pre + n + ".weight"], W.get(pre + n + ".bias")) for n in LINEARS}
        for n in NORMS:
            teacher[n], student[n] = tl.get_submodule(n).weight, W[pre + n + ".weight"]
        P = {
            "q": layer.self_attn["q"],
            "gate": layer.mlp["gate"],
            "o": layer.self_attn["o"],
            "down": layer.mlp["down"],
            "o_align": getattr(layer.self_attn, "o_align", None),
            "down_align": getattr(layer.mlp, "down_align", None),
        }
        return teacher, student, P

    def _layer(
        self,
        terms: tuple[tuple[CloneTerm, ...], tuple[CloneTerm, ...]],
        x_t: torch.Tensor,
        x_s: torch.Tensor,
        rope_t,
        rope_s,
        teacher: LayerTensors,
        student: LayerTensors,
        P: dict[str, torch.Tensor | None],
    ):
        """One decoder layer of the teacher (no grad) and the student side by side.

        x_t: [B, T, d_T], x_s: [B, T, d_S] residual streams; rope_t/rope_s: (cos, sin) [B, T, hd] in
        each side's dtype; terms: (attention, FFN) clone terms of this layer (`self.terms` or
        NO_TERMS); teacher, student, P: from `_layer_weights`. Returns the next residual streams
        and {term: E(student, target)}. Free of the layer index, so `compile_layers` compiles one
        graph that serves every layer.
        """
        attn_terms, ffn_terms = terms
        eps, hd, act = self.eps, self.head_dim, self._act_fn[0]
        with torch.no_grad():
            t = self_attention_block(x_t, teacher, rope_t, eps, hd)
        s = self_attention_block(x_s, student, rope_s, eps, hd)
        mses = self._clone_mses(attn_terms, s, t, teacher, P)
        x_t, x_s = x_t + t["o"], x_s + s["o"]

        with torch.no_grad():
            t = mlp_block(x_t, teacher, act, eps)
        s = mlp_block(x_s, student, act, eps)
        mses.update(self._clone_mses(ffn_terms, s, t, teacher, P))
        return x_t + t["down"], x_s + s["down"], mses

    def _clone_mses(
        self, terms: tuple[CloneTerm, ...], s: dict, t: dict, teacher: LayerTensors, P: dict
    ) -> dict[str, torch.Tensor]:
        """{term: E(student, target)} of one block (scalars; relative: LRCConfig.clone_normalize)."""
        return {term.name: clone_mse(*term.pair(s, t, teacher, P), self.relative_mse) for term in terms}

    # ------------------------------------------------------------------ the loss (Eq. 7-9)
    def clone(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CloneOutput:
        """Run teacher and student side by side on input_ids [B, T]; labels [B, T] (default:
        input_ids; -100 = ignored) for the LM loss.

        The weights are generated here, or once per `accumulation_window()`.
        `.losses` holds scalars "kl", "lm" (detached values, always reported; in `.loss` only when use_kl/use_lm),
        "clone" and one "clone/<term>" per enabled term (summed over layers).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids
        elif labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        self.check_length(T)
        cfg, tm = self.config, self.teacher.model
        TW, W = self.generated_weights()
        per_term: dict[str, list[torch.Tensor]] = {t: [] for t in cfg.clone_terms}

        # ---- embeddings and the teacher's RoPE
        position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        with torch.no_grad():
            x_t = tm.embed_tokens(input_ids)  # [B, T, d_T]
            cos, sin = tm.rotary_emb(x_t, position_ids)  # [B, T, hd]: the teacher's own RoPE
        x_s = F.embedding(input_ids, W["model.embed_tokens.weight"])  # [B, T, d_S]
        rope_t, rope_s = (cos, sin), (cos.to(x_s.dtype), sin.to(x_s.dtype))

        # ---- decoder layers, teacher and student side by side, with the clone terms
        layer_fn = self._compiled_layer or self._layer
        for i in range(self.num_layers):
            terms = self.terms if i in self.clone_layer_ids else NO_TERMS
            x_t, x_s, mses = layer_fn(terms, x_t, x_s, rope_t, rope_s, *self._layer_weights(i, TW, W))
            for t, v in mses.items():
                per_term[t].append(v)

        # ---- final norm and head: L_KL + L_LM
        with torch.no_grad():
            h_t = tm.norm(x_t)  # [B, T, d_T]
        head = W["lm_head.weight"] if not self.student_tied else W["model.embed_tokens.weight"]  # [V, d_S]
        h_s = rms_norm(x_s, W["model.norm.weight"], self.eps)  # [B, T, d_S]
        # logits = h_s head^T and teacher_logits = h_t lm_head^T are never formed at [B, T, V]:
        # head_losses takes the KL and LM loss chunk by chunk (CloneOutput.logits forms them on demand)
        head_loss, losses = head_losses(
            h_s,
            head,
            labels,
            (h_t, TW["lm_head.weight"], self.teacher.lm_head.bias),
            temperature=cfg.kl_temperature,
            reduction=cfg.kl_reduction,
            kl_weight=float(cfg.use_kl),
            lm_weight=float(cfg.use_lm),
            chunk_losses=self._head_chunk,
        )

        # ---- L_clone, summed over layers per term; L = L_KL + L_LM + alpha * L_clone
        zero = h_s.new_zeros((), dtype=torch.float32)
        for t, vals in per_term.items():
            losses[f"clone/{t}"] = torch.stack(vals).sum() if vals else zero
        n_terms = sum(len(v) for v in per_term.values())
        clone = sum((losses[f"clone/{t}"] for t in per_term), zero)
        if cfg.clone_reduction == "mean" and n_terms:
            clone = clone / n_terms
        losses["clone"] = clone
        loss = cfg.alpha * clone + head_loss  # + KL and LM as switched on (use_kl, use_lm)
        return CloneOutput(
            loss=loss,
            losses=losses,
            hidden=h_s,
            head=head,
            teacher_hidden=h_t,
            teacher_head=(TW["lm_head.weight"], self.teacher.lm_head.bias),
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CloneOutput:
        return self.clone(input_ids, labels)

    # ------------------------------------------------------------------ export (lrc_src.export)
    def export_student(self, device: str | torch.device | None = None) -> PreTrainedModel:
        """The student as a plain transformers model of the teacher's class (`export.export_student`)."""
        return export.export_student(self, device)

    def save_student(self, directory: str | Path, tokenizer=None) -> Path:
        """Write the exported student (+ tokenizer) to `directory` (`export.save_student`)."""
        return export.save_student(self, directory, tokenizer)
