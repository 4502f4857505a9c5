"""Training and calibration data from JSONL and plain text, tokenized with loss masks.

JSONL rows may hold chat `messages`, `prompt` + `completion`, or `text`. Rows with an answer
(assistant turns, completions) train only on the answer's tokens; `text` rows and plain-text files
train on every token. Plain-text files are split into blank-line-separated passages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


class DataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON: {exc}") from None
            if not isinstance(row, dict) or not ({"messages", "prompt", "text"} & row.keys()):
                raise DataError(f"{path}:{n}: expected an object with 'messages', 'prompt'/'completion' or 'text'")
            rows.append(row)
        if not rows:
            raise DataError(f"{path} holds no rows")
        return rows
    passages = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not passages:
        raise DataError(f"{path} holds no text")
    return [{"text": p} for p in passages]


def last_turn(messages: list[dict], role: str):
    """The content of the last `role` message of a conversation; None where it has none."""
    said = [m["content"] for m in messages if m.get("role") == role]
    return said[-1] if said else None


def prompt_of(row: dict) -> str:
    """What a JSONL row asks: its `prompt`, else the last user turn of its `messages` ("" with none),
    else its `text`."""
    if "prompt" in row:
        return str(row["prompt"])
    if "messages" in row:
        user = last_turn(row["messages"], "user")
        return "" if user is None else user
    return str(row.get("text", ""))


def tokenize(rows: list[dict], tokenizer, seq_len: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    text_stream: list[int] = []
    for row in rows:
        if "messages" in row:
            out.append(_truncate(_chat_example(row["messages"], tokenizer), seq_len))
        elif "prompt" in row:
            p = tokenizer.encode(str(row["prompt"]), add_special_tokens=True)
            c = tokenizer.encode(str(row.get("completion", "")), add_special_tokens=False)
            c = c + ([eos] if eos is not None else [])
            out.append(_truncate(Example(p + c, [IGNORE] * len(p) + c), seq_len))
        else:  # plain text: pack into full-length windows
            text_stream += tokenizer.encode(str(row["text"]), add_special_tokens=False) + ([eos] if eos else [])
    for i in range(0, max(0, len(text_stream) - 8), seq_len):
        window = text_stream[i:i + seq_len]
        out.append(Example(window, list(window)))
    return [e for e in out if any(label != IGNORE for label in e.labels)]


def _chat_example(messages: list[dict], tokenizer) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list")
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
            ids, labels = _extend(ids, labels, prompt, train=False)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        ids, labels = _extend(ids, labels, full, train=m.get("role") == "assistant")
    return Example(ids, labels)


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def _extend(ids, labels, rendered, train: bool):
    """Append what `rendered` adds beyond `ids` (chat templates render each prefix the same way)."""
    new = rendered[len(ids):] if rendered[: len(ids)] == ids else rendered
    base_ids = ids if rendered[: len(ids)] == ids else []
    base_labels = labels if base_ids else []
    return base_ids + new, base_labels + (list(new) if train else [IGNORE] * len(new))


def _truncate(e: Example, seq_len: int) -> Example:
    return Example(e.input_ids[:seq_len], e.labels[:seq_len])


def pad_batches(examples: list[Example], size: int, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) batches; padding is IGNOREd in the loss."""
    for i in range(0, len(examples), size):
        chunk = examples[i:i + size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[j, :n] = torch.tensor(e.input_ids)
            labels[j, :n] = torch.tensor(e.labels)
            mask[j, :n] = 1
        yield ids, mask, labels
