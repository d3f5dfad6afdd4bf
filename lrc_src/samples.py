"""What the models write: greedy continuations of a fixed prompt set, as a tidy table.

A held-out loss of 3.3 vs 8.1 nats is a number; the continuation of the same prompt by the teacher
and by each student is a picture of it. The prompts are fixed by a seed: the opening words of a few
held-out documents (never training text), plus a few plain instructions, which an instruction-tuned
teacher receives through its chat template. Decoding is greedy in float32, so the table is the same
on every run on the same machine.

    samples_frame({"teacher": "results/tiny/assets/teacher", "lrc": "results/tiny/runs/lrc/student"},
                  sample_prompts("results/tiny/assets/heldout.jsonl"))
    -> DataFrame(model, kind, prompt, output)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from lrc_src.fileio import read_heldout_texts

COLUMNS = ("model", "kind", "prompt", "output")
INSTRUCTIONS = (
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a dictionary is in Python.",
    "Name three colours.",
)


def heldout_openings(heldout_path: str | Path, n: int, words: int, seed: int) -> list[str]:
    """The first `words` words of `n` held-out documents chosen by `seed` (documents with fewer
    than 2 * `words` words are skipped, so a continuation has text to aim at)."""
    path = Path(heldout_path)
    texts = read_heldout_texts(path)
    long_enough = [t.split() for t in texts if len(t.split()) >= 2 * words]
    if len(long_enough) < n:
        raise ValueError(f"{str(path)!r} has {len(long_enough)} documents of >= {2 * words} words; need {n}")
    chosen = sorted(random.Random(seed).sample(range(len(long_enough)), n))
    return [" ".join(long_enough[i][:words]) for i in chosen]


def sample_prompts(
    heldout_path: str | Path,
    n_heldout: int = 4,
    words: int = 24,
    seed: int = 0,
    instructions: Sequence[str] = INSTRUCTIONS,
) -> list[dict]:
    """[{"kind": "heldout" | "instruction", "prompt": text}, ...] in a fixed order."""
    prompts = [{"kind": "heldout", "prompt": p} for p in heldout_openings(heldout_path, n_heldout, words, seed)]
    return prompts + [{"kind": "instruction", "prompt": p} for p in instructions]


def _input_ids(tokenizer, kind: str, prompt: str) -> torch.Tensor:
    """[1, T] ids: instructions through the chat template when the tokenizer has one."""
    if kind == "instruction" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return torch.tensor([list(ids)])
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Sequence[Mapping[str, str]], max_new_tokens: int) -> list[str]:
    """The greedy continuation (new tokens only, special tokens dropped) of each prompt."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for p in prompts:
        ids = _input_ids(tokenizer, p["kind"], p["prompt"])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


def samples_frame(
    models: Mapping[str, str | Path], prompts: Sequence[Mapping[str, str]], max_new_tokens: int = 32
) -> pd.DataFrame:
    """One row per (model, prompt): the model's greedy continuation. `models` maps a name to an HF
    folder holding the model and its tokenizer (a run's student/ or the profile's teacher)."""
    from lrc_src.teachers import load_model_folder, load_tokenizer

    rows = []
    for name, folder in models.items():
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: {str(folder)!r} holds no model (no config.json)")
        tokenizer = load_tokenizer(folder, name=name)
        model = load_model_folder(folder, torch.float32)
        for p, text in zip(prompts, greedy_continuations(model, tokenizer, prompts, max_new_tokens)):
            rows.append({"model": name, "kind": p["kind"], "prompt": p["prompt"], "output": text})
    return pd.DataFrame(rows, columns=list(COLUMNS))
