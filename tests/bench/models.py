"""The model a bench script runs: the embedded SmolLM2 folder (converted once into the cache) by its id,
or any other id or folder as given."""

from __future__ import annotations

from pathlib import Path

from server.default_model import DEFAULT_MODEL_ID, default_model_dir


def local_model(model: str) -> str:
    return str(default_model_dir(Path.home() / ".cache" / "slimserve")) if model == DEFAULT_MODEL_ID else model
