"""Sampling defaults from a model folder's generation_config.json, applied to the sampling fields a
request leaves out, as vLLM does (`--generation-config auto`). `generation_config: none` turns it off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# vLLM's list: the generation_config keys that become request defaults
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_VALID = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (-1, 2**31 - 1), "min_p": (0.0, 1.0),
          "repetition_penalty": (1e-9, 2.0)}


def sampling_defaults(folder: str | Path) -> dict[str, float | int]:
    """The sampling values the folder's generation_config.json sets; {} when it has none (or no file)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    out: dict[str, float | int] = {}
    for key in SAMPLING_DEFAULT_FIELDS:
        value = data.get(key) if isinstance(data, dict) else None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = _VALID[key]
        if not low <= value <= high:
            log.warning("ignoring %s=%r in %s: outside [%s, %s]", key, value, path, low, high)
            continue
        out[key] = int(value) if key == "top_k" else float(value)
    if out.get("top_k") == 0:  # transformers' "no top-k"; vLLM spells it -1
        out["top_k"] = -1
    return out
