"""Settings -> loaded engines. The only place that knows which engine class serves which setting."""

from __future__ import annotations

from pathlib import Path

from server.default_model import DEFAULT_MODEL_ID, default_model_dir
from server.engines.base import Engine
from server.errors import ConfigError
from server.settings import ServeSettings


# --quantization names that vLLM spells its own way; others (gptq, awq, ...) pass through unchanged
VLLM_LOAD_TIME = {"int8": "int8_per_channel_weight_only", "fp8": "fp8", "int4": "bitsandbytes",
                  "nf4": "bitsandbytes"}


def resolve_model_path(settings: ServeSettings) -> str:
    """The embedded default, a local folder, or (where the network allows) a hub id."""
    if settings.model == DEFAULT_MODEL_ID:
        return str(default_model_dir(settings.cache_dir))
    path = Path(settings.model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model", f"{path} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if settings.model.startswith((".", "/", "~")):
        raise ConfigError("model", f"no such folder: {settings.model}")
    return settings.model  # a hub id


def build_engines(settings: ServeSettings) -> dict[str, Engine]:
    path = resolve_model_path(settings)
    if settings.engine == "vllm":
        from server.engines.vllm_engine import VLLMEngine

        options = settings.vllm_options()
        if settings.quantization in VLLM_LOAD_TIME:  # slimserve's names for vLLM's own load-time methods
            options["quantization"] = VLLM_LOAD_TIME[settings.quantization]
        engine = VLLMEngine.load(
            settings.model_id, path, dtype=settings.dtype, max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
            options=options, trust_remote_code=settings.trust_remote_code,
        )
        return {settings.model_id: engine}
    vllm_only = {k for k in settings.vllm_options() if k != "quantization"}
    if vllm_only:
        raise ConfigError(sorted(vllm_only)[0], "this setting applies to the vllm engine only")
    from server.engines.torch_engine import TorchEngine

    engine = TorchEngine.load(
        settings.model_id, path, dtype=settings.dtype, device=settings.device,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_prefill_tokens=settings.max_prefill_tokens, trust_remote_code=settings.trust_remote_code,
        quantization=settings.quantization,
    )
    return {settings.model_id: engine}
