"""Chat data for the SFT stage: render conversations with the tokenizer's chat template and mask
everything but the assistant replies (labels = -100 on prompt, system and padding tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrc_src.fileio import read_jsonl

IGNORE = -100


def read_hub_chats(dataset_id: str, split: str = "train_sft") -> list[list[dict]]:
    """Conversations of a hub chat dataset with a `messages` column (e.g. UltraChat-200k's
    train_sft split). Offline it fails at once naming the dataset."""
    from lrc_src.hub import hub_offline_reason

    reason = hub_offline_reason(datasets=True)
    if reason:
        raise FileNotFoundError(
            f"chat dataset {dataset_id!r} needs the Hugging Face hub, which is unavailable ({reason})"
        )
    import datasets

    return [row["messages"] for row in datasets.load_dataset(dataset_id, split=split)]


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a jsonl file, one {"messages": [{"role": ..., "content": ...}, ...]} per line,
    or from the hub with `hub:<dataset id>` (see read_hub_chats)."""
    if str(path).startswith("hub:"):
        return read_hub_chats(str(path)[4:])
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat data {str(path)!r} does not exist")
    shape = '{"messages": [{"role": ..., "content": ...}, ...]}'
    convs = [row["messages"] for row in read_jsonl(path, _is_conversation, shape)]
    if not convs:
        raise ValueError(f"chat data {str(path)!r} has no conversations")
    return convs


def _is_conversation(row: dict) -> bool:
    msgs = row.get("messages")
    return isinstance(msgs, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)


def _ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def encode_conversation(tokenizer, messages: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, labels [seq_len]: assistant tokens are targets, the rest is masked; padded with EOS."""
    ids = _ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:j], add_generation_prompt=True))
        prefix = _ids(tokenizer, messages[: j + 1])
        end = len(prefix)
        if ids[:end] != prefix:
            raise ValueError(
                f"the chat template of the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not "
                f"prefix-stable: rendered alone, the conversation up to its message {j} (an assistant reply) "
                "is not the start of the whole conversation's rendering, so the reply's tokens cannot be "
                "located; SFT needs a template under which a conversation's first messages render the same "
                "whatever follows them"
            )
        labels[start:end] = ids[start:end]
    ids, labels = ids[:seq_len], labels[:seq_len]
    pad = seq_len - len(ids)
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return (np.array(ids + [pad_id] * pad, dtype=np.int64), np.array(labels + [IGNORE] * pad, dtype=np.int64))


def encode_chat_file(tokenizer, path: str | Path, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All conversations of a chat jsonl: input_ids [N, seq_len], labels [N, seq_len]. Data in which
    no assistant token falls within seq_len (e.g. ShareGPT's human/gpt roles) is refused: SFT would
    train on nothing."""
    convs = read_chat_jsonl(path)
    pairs = [encode_conversation(tokenizer, c, seq_len) for c in convs]
    ids, labels = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    if not (labels != IGNORE).any():
        roles = sorted({m["role"] for c in convs for m in c})
        raise ValueError(
            f"chat data {str(path)!r} has no assistant reply within data.seq_len={seq_len} tokens "
            f"(roles found: {roles}; replies are the messages of role 'assistant')"
        )
    return ids, labels
