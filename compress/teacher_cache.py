"""The teacher's top-k next-token distribution per position, cached to disk, so several students
(or several runs of one) train from one teacher pass without loading the teacher again.

For every position of every tokenized example (in tokenization order, before any shuffle): the
teacher's k most likely next-token ids (int32), their log-probabilities at T=1 (float16) and the
log of the mass left outside them (float32), in safetensors shards (`ids`, `logprobs`, `tail`,
`lengths`: positions per example): 6k + 4 bytes per position (196 at k = 32). `teacher_cache.json`,
written last so a half-built cache is never used, records the teacher, the data's sha256, a hash of
the tokenizer's vocabulary, seq_len, k and the mean probability mass the top k cover (the rest is what the
top-k loss lumps into one outcome; see distill_losses.topk_forward_kl).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

MANIFEST = "teacher_cache.json"
SHARD_POSITIONS = 1 << 19  # ~100 MB per shard at k = 32


class TeacherCacheError(ValueError):
    pass


def vocab_hash(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


@torch.no_grad()
def build_cache(teacher, examples, folder: Path, *, k: int, batch_size: int, pad_id: int, meta: dict,
                progress: bool = True) -> dict:
    """Run the teacher once over `examples`; `meta` (teacher, data_sha256, vocab_sha256, seq_len) goes
    into the manifest and is what `open_cache` checks."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from compress.data import pad_batches
    from compress.distill_losses import tail_logmass

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    teacher.eval()
    shards: list[str] = []
    pending: dict[str, list[torch.Tensor]] = {"ids": [], "logprobs": [], "tail": [], "lengths": []}
    held, mass, positions = 0, 0.0, 0

    def flush() -> None:
        nonlocal held
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({key: torch.cat(parts) for key, parts in pending.items()}, folder / name)
        shards.append(name)
        for parts in pending.values():
            parts.clear()
        held = 0

    started = time.perf_counter()
    n_batches = -(-len(examples) // batch_size)
    for i, (ids, mask, _) in enumerate(tqdm(pad_batches(examples, batch_size, pad_id), total=n_batches,
                                            desc=f"teacher top-{k}", unit="batch", disable=not progress)):
        logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        top = torch.log_softmax(logits, -1).topk(k, dim=-1)
        tail = tail_logmass(logits.flatten(0, 1), top.indices.flatten(0, 1)).view(logits.shape[:2])
        for j, e in enumerate(examples[i * batch_size:(i + 1) * batch_size]):
            n = len(e.input_ids)
            pending["ids"].append(top.indices[j, :n].to(torch.int32))
            pending["logprobs"].append(top.values[j, :n].to(torch.float16))
            pending["tail"].append(tail[j, :n])
            pending["lengths"].append(torch.tensor([n], dtype=torch.int64))
            mass += float(top.values[j, :n].exp().sum())
            held += n
            positions += n
        if held >= SHARD_POSITIONS:
            flush()
    if held or not shards:
        flush()
    manifest = {**meta, "k": k, "examples": len(examples), "positions": positions, "shards": shards,
                "mean_topk_mass": round(mass / max(positions, 1), 4),
                "seconds": round(time.perf_counter() - started, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_cache_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class TeacherCache:
    """A checked cache in memory; `batch` gives rows padded like compress.data.pad_batches."""

    def __init__(self, folder: Path, manifest: dict):
        from safetensors.torch import load_file

        self.folder, self.manifest = Path(folder), manifest
        parts = [load_file(Path(folder) / name) for name in manifest["shards"]]
        self.ids = torch.cat([p["ids"] for p in parts])
        self.logprobs = torch.cat([p["logprobs"] for p in parts])
        self.tail = torch.cat([p["tail"] for p in parts])
        self.lengths = torch.cat([p["lengths"] for p in parts])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])

    def batch(self, indices: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B, width, k] int64, logprobs [B, width, k] float32, tail [B, width] float32); padding is
        zeros (masked by the loss)."""
        k = self.ids.shape[1]
        ids = torch.zeros((len(indices), width, k), dtype=torch.int64)
        lps = torch.zeros((len(indices), width, k), dtype=torch.float32)
        tail = torch.zeros((len(indices), width), dtype=torch.float32)
        for row, i in enumerate(indices):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            ids[row, :b - a] = self.ids[a:b].long()
            lps[row, :b - a] = self.logprobs[a:b].float()
            tail[row, :b - a] = self.tail[a:b]
        return ids, lps, tail


def open_cache(folder: Path, *, data_sha256: str, vocab_sha256: str, seq_len: int, examples) -> TeacherCache:
    """Refuse a cache made from other data, another tokenizer or another seq_len: its rows would not
    line up with this run's tokens."""
    manifest = read_cache_manifest(folder)
    if manifest is None:
        raise TeacherCacheError(f"{folder} holds no teacher cache ({MANIFEST} missing); build one with "
                                "--cache-teacher DIR")
    problems = []
    if manifest.get("data_sha256") != data_sha256:
        problems.append("it was built from other data (sha256 differs from --data)")
    if manifest.get("vocab_sha256") != vocab_sha256:
        problems.append("the student's tokenizer differs from the teacher's the cache was built with")
    if manifest.get("seq_len") != seq_len:
        problems.append(f"it was built with --seq-len {manifest.get('seq_len')}, not {seq_len}")
    if problems:
        raise TeacherCacheError(f"cannot use the teacher cache {folder}: " + "; ".join(problems))
    cache = TeacherCache(folder, manifest)
    if [len(e.input_ids) for e in examples] != cache.lengths.tolist():
        raise TeacherCacheError(f"cannot use the teacher cache {folder}: its positions do not match this "
                                "run's tokenized data")
    return cache
