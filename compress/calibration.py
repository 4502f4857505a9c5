"""Calibration samples for quantization, from plain text or JSONL (no hub downloads)."""

from __future__ import annotations

import random
from pathlib import Path

from compress.data import DataError, read_records


def calibration_texts(path: Path, num_samples: int, seed: int = 0, min_chars: int = 32) -> list[str]:
    """Up to `num_samples` passages: JSONL rows (text, prompt+completion, or chat turns joined) or
    blank-line-separated passages of a text file; a text file of single lines is grouped by lines."""
    rows = read_records(path)
    texts = []
    for row in rows:
        if "text" in row:
            texts.append(str(row["text"]))
        elif "prompt" in row:
            texts.append(f"{row['prompt']}{row.get('completion', '')}")
        else:
            texts.append("\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict)))
    if len(texts) == 1:  # one long passage (a file of lines): cut it into chunks of ~20 lines
        lines = [line for line in texts[0].splitlines() if line.strip()]
        texts = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    texts = [t for t in texts if len(t) >= min_chars]
    if not texts:
        raise DataError(f"{path} holds no passage of at least {min_chars} characters")
    random.Random(seed).shuffle(texts)
    return texts[:num_samples]
