"""The quantized-model cache: `cache_dir/quantized/<name>`, one folder per (source weights, recipe,
calibration, backend version), shared by every server (or pod) that mounts the same cache.

- The folder name ends in a hash of all four, so a changed recipe or new weights never reuse an old
  artifact, and the same ones always do.
- One writer at a time: an exclusive `fcntl.flock` on `<name>.lock`. A second server starting
  together waits, then finds the artifact and reuses it. The kernel drops the lock when its holder
  dies, even by kill -9.
- Only whole artifacts are visible: compress.quantize writes `.<name>.partial` and renames it into
  place; a partial folder left by a killed run is removed by the next writer, never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from compress.manifest import read_manifest
from compress.quantize import Progress, QuantizeSpec, calibration_identity, quantize

log = logging.getLogger(__name__)
SUBDIR = "quantized"
KIND = "quantized-model"
RECIPE_FIELDS = ("method", "backend", "bits", "group_size", "act_order", "sym", "num_samples", "seq_len", "seed")


def cache_root(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / SUBDIR


def source_hash(model: Path) -> str:
    """sha256 over the files that define the weights and how they are read."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model).iterdir()
                   if p.suffix in (".safetensors", ".bin", ".json") and p.name != "slimserve.json")
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def backend_version(backend: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = {"gptqmodel": ("gptqmodel", "torch", "transformers"), "llmcompressor": ("llmcompressor",)}[backend]
    found = []
    for name in names:
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=?")
    return ",".join(found)


def recipe_of(spec: QuantizeSpec) -> dict:
    fields = asdict(spec)
    recipe = {k: fields[k] for k in RECIPE_FIELDS}
    if spec.method == "awq":  # AWQ's defaults changed (clipping off, scale 1 searched): new keys for AWQ only
        recipe.update(awq_clip=spec.awq_clip, awq_scale_one=spec.awq_scale_one)
    return recipe


@dataclass(frozen=True)
class CacheKey:
    name: str  # folder name: readable prefix + hash
    identity: dict  # what the hash covers, kept in the manifest


def key_for(spec: QuantizeSpec) -> CacheKey:
    identity = {"source_sha256": source_hash(spec.model), "recipe": recipe_of(spec),
                "calibration": calibration_identity(spec), "backend_version": backend_version(spec.backend)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    group = "g" + ("row" if spec.group_size == -1 else str(spec.group_size))
    name = f"{Path(spec.model).name}-{spec.method}{spec.bits}-{group}-{digest}"
    return CacheKey(name, identity)


def is_complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return folder.is_dir() and manifest is not None and manifest.get("kind") == KIND


@contextmanager
def _exclusive(lock_path: Path, on_wait: Callable[[], None] | None) -> Iterator[None]:
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_writable(cache_dir: Path) -> None:
    """Raises OSError naming the folder when artifacts cannot be written there."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def ensure(spec_without_out: QuantizeSpec, cache_dir: Path, progress: Progress | None = None,
           on_wait: Callable[[], None] | None = None) -> tuple[Path, bool]:
    """The cached artifact for this recipe, made if missing. Returns (folder, made_here)."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = key_for(spec_without_out)
    folder = root / key.name
    if is_complete(folder):
        return folder, False
    with _exclusive(root / f"{key.name}.lock", on_wait):
        if is_complete(folder):  # another process made it while we waited
            return folder, False
        if folder.exists():  # a folder without its manifest is not ours to trust
            shutil.rmtree(folder)
        spec = QuantizeSpec(**{**asdict(spec_without_out), "out": folder})
        started = time.perf_counter()
        report = quantize(spec, progress)
        _add_identity(folder, key.identity)
        log.info("quantized %s in %.0f s into %s", spec.model, time.perf_counter() - started, folder)
        del report
        return folder, True


def _add_identity(folder: Path, identity: dict) -> None:
    path = folder / "slimserve.json"
    data = json.loads(path.read_text())
    data["cache_identity"] = identity
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def entries(cache_dir: Path) -> list[dict]:
    """Every artifact in the cache with its size and what made it (for `compress cache ls`)."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        manifest = read_manifest(folder) or {}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows.append({"name": folder.name, "path": str(folder), "bytes": size,
                     "complete": is_complete(folder) and not folder.name.startswith("."),
                     "source_model": manifest.get("source_model"), "method": manifest.get("method"),
                     "bits": manifest.get("bits"), "created": manifest.get("created")})
    return rows


def remove(cache_dir: Path, name: str) -> int:
    """Delete one entry (under its lock, so never under a writer); returns the bytes freed."""
    root = cache_root(cache_dir)
    folder = root / name
    if "/" in name or name in ("", ".", "..") or not folder.is_dir():
        raise FileNotFoundError(f"no cache entry {name!r} in {root}")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    with _exclusive(root / f"{name.lstrip('.').removesuffix('.partial')}.lock", None):
        shutil.rmtree(folder)
    return size
