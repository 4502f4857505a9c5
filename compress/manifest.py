"""The slimserve.json manifest beside every artifact: what it is, where it came from, how it measured.
Read and written here only."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

MANIFEST = "slimserve.json"


def write_manifest(folder: Path, kind: str, **fields: Any) -> Path:
    data = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_hash(*paths: Path) -> str:
    """sha256 over the files' bytes, in order: identifies the data an artifact was made from."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def update_manifest(folder: Path, **fields: Any) -> Path:
    """Set `fields` in the folder's manifest, keeping the rest, `created` included (a folder without one
    gets kind "model")."""
    data = read_manifest(folder) or {}
    kind = data.pop("kind", "model")
    return write_manifest(folder, kind, **{**data, **fields})
