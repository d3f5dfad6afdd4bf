"""Typed experiment configuration, loaded from commented YAML profiles (config/*.yaml).

One `ExperimentConfig` describes a training run: which method, which teacher, which data, the
method's settings and the optimisation budget. Unknown keys are errors naming the key; values
are coerced to the declared types (YAML reads `1e-3` as a string; we do not).

    cfg = load_config("config/tiny.yaml", overrides=["train.max_tokens=10240", "lrc.alpha=0.5"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("lrc", "scratch", "kd", "tinybert", "prune_kd", "sft")
INIT_FROM_METHODS = ("scratch", "kd", "prune_kd")  # the methods baseline.init_from can start


# The method's settings (the `lrc:` section). Kept free of torch, like transformers'
# configuration_*.py, because the workflow reads every run's config when it builds its DAG.
ATTN_TERMS = {"all": ("q", "k", "v", "o"), "io": ("attn_in", "o")}  # clone terms per attention projection
FFN_TERMS = {"all": ("gate", "up", "down"), "io": ("ffn_in", "down")}  # ... per FFN projection
INITS = ("normal", "prune", "prune_scaled", "pca")  # projection starts (lrc_src.starts)
KL_REDUCTIONS = ("batchmean", "token_mean")  # lrc_src.losses.kl_loss


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
    attn_out_space: "student" = E(o^S_attn, o^T_attn P_o) (paper); "teacher" = E(o_proj^T(attn^S),
        o_proj^T(attn^T)) (the authors' code).
    init: "normal" = every projection N(0, init_std) (authors). The others start from the teacher
        and need calibration ids (`LowRankClone.init_from_teacher`, see `lrc_src.starts`):
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
    detach_targets: detach the projected teacher targets (o^T_attn P_o, o^T_ffn P_down). The authors do
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
        if self.alignment == "extra" and self.detach_targets:
            raise ValueError(
                "detach_targets=true has no effect with alignment='extra' (its targets do not pass "
                "through P); it is only meaningful with alignment='free'"
            )
        self._check_clone_terms()
        cl = self.clone_layers
        if isinstance(cl, bool):  # a bool is an int to Python: false would clone layer 0
            raise ValueError(
                f"clone_layers={cl!r} must be null, a list of layer indices or a fraction in (0, 1]; "
                "to train without the clone loss set alpha: 0"
            )
        if cl is not None and not isinstance(cl, (list, tuple, float, int)):
            raise ValueError(f"clone_layers={cl!r} must be null, a list of layer indices or a fraction")
        if isinstance(cl, (float, int)) and not isinstance(cl, bool) and not (0 < cl <= 1):
            raise ValueError(f"clone_layers={cl} as a fraction must be in (0, 1]")
        if isinstance(cl, (list, tuple)):
            self.clone_layers = [int(i) for i in cl]

    def _check_clone_terms(self) -> None:
        valid = self.valid_terms
        if self.clone_terms is None:
            self.clone_terms = valid
            return
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

    @property
    def valid_terms(self) -> tuple[str, ...]:
        return ATTN_TERMS[self.attn_projection] + FFN_TERMS[self.ffn_projection]

    @classmethod
    def from_dict(cls, d: dict) -> LRCConfig:
        """The `lrc:` section of a YAML config as an LRCConfig (unknown keys are errors)."""
        return _build(cls, d, "lrc")


@dataclass
class DataConfig:
    """Training text: offline corpora (python-docs, kjv, local:<glob>) or a hub mix."""

    corpus: list[str] = field(default_factory=lambda: ["python-docs"])  # see lrc_src.corpora
    seq_len: int = 256  # packed sequence length (paper: 2048)
    heldout_frac: float = 0.02  # share of documents held out (by document) for evaluation
    max_train_tokens: int | None = None  # cap on tokenised training text (None = all)
    mix: dict[str, float] | None = None  # hub mix weights (paper profile), e.g. {fineweb_edu: 10}; replaces corpus
    mix_files: dict[str, str] | None = None  # local stand-ins for hub sources (same schema)
    seed: int = 0  # held-out split and block order; fixed across train.seed so every seed is scored alike

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len={self.seq_len} must be > 0")
        if not 0 < self.heldout_frac < 1:
            raise ValueError(f"data.heldout_frac={self.heldout_frac} must be in (0, 1)")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed} must be >= 0")
        if self.mix_files and not self.mix:
            raise ValueError("data.mix_files gives stand-ins for the sources of data.mix, which is not set")


@dataclass
class TrainConfig:
    """Optimisation budget and schedule (paper: AdamW 0.9/0.999, wd 0, 0.5% warmup, linear decay)."""

    max_steps: int | None = None  # optimizer steps; or set max_tokens
    max_tokens: int | None = None  # total training tokens, rounded up to whole steps (overrides max_steps)
    batch_size: int = 4  # sequences per micro-batch per process (each config sets its own)
    grad_accum: int = 1
    lr: float = 1e-4
    lr_norm: float | None = None  # lr of the vector parameters: norm weights (and the baselines' biases); None = lr
    warmup_ratio: float = 0.005
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # the paper's training setup
    mixed_precision: str = "auto"  # auto | bf16 | no  (auto: bf16 where the hardware supports it)
    log_every: int = 1
    eval_every: int = 0  # held-out loss every N steps (0 = only at the end)
    eval_batches: int = 4  # held-out blocks evaluated = eval_batches * batch_size
    save_every: int = 50  # checkpoint every N steps (and at the end)
    export_at: list[int] = field(default_factory=list)  # steps at which to export a student (Fig. 4-5)
    # keep checkpoint/optimizer.safetensors (AdamW moments, 2x the trainable state) once the run is complete;
    # off by default: a finished run is exported and analysed from trainable.safetensors alone, and
    # the tiny profile's 48 runs would otherwise hold ~20 GB of optimizer state
    keep_optimizer_state: bool = False
    seed: int = 0
    # training tokens an earlier phase already took from this seed's batch stream: this run's batches
    # start after them (the LRC -> KD hand-off, baseline.init_from), so the two phases together see
    # exactly the batches one run of their summed budget sees. A multiple of batch_size x seq_len.
    skip_tokens: int = 0
    # torch.compile the decoder layers (with CUDA also the fused head's per-chunk softmax / KL work):
    # auto | on | off. auto compiles with CUDA, where compiling the layers made every method's
    # step 27-29% shorter (results/paper-1.5b, H200), and on the CPU only for runs of at
    # least CPU_COMPILE_MIN_STEPS steps (lrc_src.runtime): there a cold compile costs ~13 s and saves
    # 10-13% of each step; the threshold keeps the CPU profiles' runs (30-120 steps) eager, so they
    # repeat their committed results (compiled kernels round differently); other devices compile
    # only when asked. Methods that cannot compile (tinybert) run eagerly
    # under auto. A runtime choice: a run may resume with another value (RUNTIME_KEYS). The CLI's
    # --compile is train.compile=on.
    compile: bool | str = "auto"
    # experiment trackers beside metrics.csv: none | tensorboard | trackio | wandb, or a list
    # (lrc_src.trackers; offline, files inside the run folder; the `trackers` extra installs them)
    log_with: str | list[str] = "none"

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("train.max_steps or train.max_tokens must be set")
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be > 0")
        for name in ("max_steps", "max_tokens", "grad_clip"):  # grad_clip <= 0 would flip or zero the gradients
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be > 0")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every} must be >= 0 (0: only at the end)")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.export_at):
            raise ValueError(f"train.export_at={self.export_at} must list optimizer steps >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1): a share of the steps")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={list(self.betas)} must both be in [0, 1)")
        for name in ("skip_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r} is not one of ('auto', 'bf16', 'no')")
        if self.compile not in (True, False, "auto", "on", "off"):
            raise ValueError(f"train.compile={self.compile!r} is not one of auto, on, off")
        from lrc_src.trackers import parse_log_with

        parse_log_with(self.log_with)  # an unknown tracker or a missing package is an error now


@dataclass
class BaselineConfig:
    """Settings of the baselines at LRC's token budget: scratch, KD, TinyBERT-style, prune-then-KD."""

    kl_temperature: float = 40.0  # KD / prune_kd / tinybert logit KL (same as LRC by default)
    kl_reduction: str = "batchmean"
    use_kl: bool = True  # kd/prune_kd/tinybert (scratch never uses it)
    hidden_weight: float = 1.0  # tinybert: hidden-state MSE weight (equal weights, as TinyBERT sums them)
    attn_weight: float = 1.0  # tinybert: attention-map MSE weight
    # training batches that score the teacher's channels: prune_kd's start, and LRC's teacher-derived
    # starts (lrc.init prune, prune_scaled, pca)
    calibration_batches: int = 4
    # scratch / kd / prune_kd: start the student from this HF folder (an exported student of the
    # LRC student's shape) instead of the method's own start: the LRC -> KD hand-off
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"baseline.kl_reduction={self.kl_reduction!r} is not one of {KL_REDUCTIONS}")
        if self.kl_temperature <= 0:
            raise ValueError(f"baseline.kl_temperature={self.kl_temperature} must be > 0")
        if self.calibration_batches < 1:
            raise ValueError(f"baseline.calibration_batches={self.calibration_batches} must be >= 1")
        for name in ("hidden_weight", "attn_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"baseline.{name}={getattr(self, name)} must be >= 0")


@dataclass
class SFTConfig:
    """Supervised fine-tuning of an exported model on chat data (paper: UltraChat-200k)."""

    model: str | None = None  # HF folder of the model to fine-tune
    chat_data: str | None = None  # jsonl with {"messages": [{"role", "content"}, ...]}


@dataclass
class ExperimentConfig:
    """One training run. `load_config` requires `lrc.student_hidden_size` (but for sft) and a budget
    (`train.max_steps` or `train.max_tokens`); the defaults here serve code that builds one directly."""

    method: str = "lrc"
    teacher: str = "smollm2-135m-instruct"  # local HF folder, hub id, smollm2-135m-instruct, random-*-micro
    lrc: LRCConfig = field(default_factory=lambda: LRCConfig(student_hidden_size=288))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=10))
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.method == "sft" and not self.sft.model:
            raise ValueError("method=sft needs sft.model (an exported HF folder)")
        if self.baseline.init_from is not None and self.method not in INIT_FROM_METHODS:
            raise ValueError(
                f"baseline.init_from is set but method={self.method!r} has its own start; "
                f"it applies to {', '.join(INIT_FROM_METHODS)}"
            )
        if self.train.skip_tokens % self.micro_tokens():
            raise ValueError(
                f"train.skip_tokens={self.train.skip_tokens} is not a whole number of micro-batches "
                f"(train.batch_size x data.seq_len = {self.micro_tokens()} tokens)"
            )

    def micro_tokens(self) -> int:
        """Tokens per micro-batch of one process: batch size x sequence length."""
        return self.train.batch_size * self.data.seq_len

    def step_tokens(self, processes: int = 1) -> int:
        """Tokens per optimizer step: micro-batch x accumulation x processes."""
        return self.micro_tokens() * self.train.grad_accum * processes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type `tp`, or raise ValueError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"{key}={value!r}: expected {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp) or (Any,)
        if origin is tuple and Ellipsis not in args and len(value) != len(args):
            raise ValueError(f"{key}={list(value)!r}: expected {len(args)} values")
        inner = args[0]
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected a number")
        try:
            num = float(value) if tp is float else value
            if tp is int:
                if isinstance(value, str):
                    num = float(value)
                if float(num) != int(num):
                    raise ValueError
                num = int(num)
            return num
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ValueError(f"{key}={value!r}: expected {tp.__name__}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans
            raise ValueError(f"{key}={value!r}: expected a string; quote it, e.g. {key}='no'")
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r}: expected a string")
        return value
    return value


def _build(cls: type, d: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ValueError(
            f"unknown config key(s) {[f'{prefix}.{k}'.lstrip('.') for k in unknown]}{where}; allowed: {names}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d
    ]
    if required:
        raise ValueError(f"config key(s) {[f'{prefix}.{k}'.lstrip('.') for k in required]} must be set")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}".lstrip(".")) for k, v in d.items()}
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--set {item!r}: the value is not valid YAML (quote strings, close lists)") from None
        out.append((key.strip(), value))
    return out


def config_from_dict(d: dict, overrides: list[str] | None = None) -> ExperimentConfig:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()}
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        _set_dotted(d, key, value)
    # A saved config holds both (corpus keeps its default beside a mix), so only an override of
    # the corpus, which the mix would silently replace, is refused.
    data = d.get("data")
    if any(key == "data.corpus" for key, _ in parsed) and isinstance(data, dict) and data.get("mix"):
        raise ValueError(
            "--set data.corpus has no effect while the config sets data.mix (the hub mix replaces "
            "the corpus); add --set data.mix=null to train on data.corpus"
        )
    train = d.get("train")
    if any(key == "train.max_steps" for key, _ in parsed) and isinstance(train, dict) and train.get("max_tokens"):
        raise ValueError(
            "--set train.max_steps has no effect while the config sets train.max_tokens (which "
            "decides the budget); set train.max_tokens instead, or add --set train.max_tokens=null"
        )
    # A file always gives the student's size and the budget: the dataclasses' defaults (d_S 288,
    # 10 steps) serve code that builds a config directly, and would train an unasked-for run here.
    if d.get("method", "lrc") != "sft":
        d.setdefault("lrc", {})
    d.setdefault("train", {})
    return _build(ExperimentConfig, d)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML profile, apply `key.sub=value` overrides, validate, return the typed config."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a folder; give a .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        d = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r} must contain a mapping")
    return config_from_dict(d, overrides)


# Settings that change how a run executes, not what it computes: a run folder resumes (and counts as
# the same experiment) when only these differ. A config.yaml written before a setting existed
# matches that setting's default.
RUNTIME_KEYS = (("train", "compile"), ("train", "log_with"))


def same_experiment(saved: str | None, cfg: ExperimentConfig) -> bool:
    """Whether a run folder's config.yaml text describes the experiment `cfg` (runtime keys aside)."""
    if saved is None:
        return False

    def identity(d: dict) -> dict:
        d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        for section, key in RUNTIME_KEYS:
            if isinstance(d.get(section), dict):
                d[section].pop(key, None)
        return d

    try:  # the saved config through this version's defaults: a setting added since matches its default
        then = config_from_dict(identity(yaml.safe_load(saved) or {}))
    except (ValueError, TypeError):  # a key this version does not know, or a value it refuses
        return False
    return identity(yaml.safe_load(dump_config(then))) == identity(yaml.safe_load(dump_config(cfg)))


def dump_config(cfg: ExperimentConfig) -> str:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
