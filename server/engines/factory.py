"""Settings -> loaded engines. The only place that knows which engine class serves which setting."""

from __future__ import annotations

import logging
from pathlib import Path

from server.default_model import DEFAULT_MODEL_ID, default_model_dir
from server.engines.base import Engine
from server.engines.generation_defaults import sampling_defaults
from server.engines.speculation_config import NgramConfig, speculative_unsupported, torch_speculation, \
    vllm_speculative_config
from server.errors import ConfigError
from server.load_progress import LoadProgress
from server.quantize_at_load import check as check_quantization, quantized_path, wants_quantizing
from server.settings import ServeSettings


log = logging.getLogger(__name__)

# --quantization names that vLLM spells its own way; others (gptq, awq, ...) pass through unchanged
VLLM_LOAD_TIME = {"int8": "int8_per_channel_weight_only", "fp8": "fp8", "int4": "bitsandbytes",
                  "nf4": "bitsandbytes"}


def resolve_model_path(settings: ServeSettings) -> str:
    """The embedded default, a local folder, or (where the network allows) a hub id."""
    return resolve_model(settings.model, settings.cache_dir)


def resolve_model(model: str, cache_dir: Path, setting: str = "model") -> str:
    if model == DEFAULT_MODEL_ID:
        return str(default_model_dir(cache_dir))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(setting, f"{path} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if model.startswith((".", "/", "~")):
        raise ConfigError(setting, f"no such folder: {model}")
    return model  # a hub id


def preflight(settings: ServeSettings, progress: LoadProgress | None = None) -> dict[str, tuple[ServeSettings, str]]:
    """Every refusal before any work, as `serve` and `compress warm` both run it: each local entry's
    settings and model folder, its load-time quantization recipe and speculative config checked."""
    progress = progress or LoadProgress()
    checked = {}
    for entry in settings.entries():  # no model is converted or quantized while another is refused
        if entry.engine == "remote":
            continue
        local = settings.for_entry(entry)
        progress.stage(entry.name, "converting" if local.model == DEFAULT_MODEL_ID else "resolving")
        source = resolve_model_path(local)
        if wants_quantizing(local, source):
            check_quantization(local, source, lora=lora_enabled(local))
        check_speculative(local, f"models.{entry.name}.speculative_config" if settings.models else "speculative_config")
        checked[entry.name] = (local, source)
    return checked


def build_engines(settings: ServeSettings, progress: LoadProgress | None = None) -> dict[str, Engine]:
    """One engine per served model, in the order serve.yaml lists them. Every model's load-time
    quantization recipe is checked before the first one starts any work."""
    progress = progress or LoadProgress()
    engines: dict[str, Engine] = {}
    entries = settings.entries()
    by_name = {e.name: e for e in entries}
    sources = {name: source for name, (_, source) in preflight(settings, progress).items()}
    for entry in entries:
        if entry.engine == "remote":
            from server.engines.remote import RemoteEngine

            fallback = settings.router.fallback if settings.router is not None else None
            engines[entry.name] = RemoteEngine.from_entry(
                entry, unhealthy_seconds=fallback.unhealthy_seconds if fallback else 10.0)
            continue
        draft = None
        if entry.draft:  # another entry's model (or a folder) as the speculative draft
            source = by_name[entry.draft].model if entry.draft in by_name else entry.draft
            draft = resolve_model(source or settings.model, settings.cache_dir, f"models.{entry.name}.draft")
        local = settings.for_entry(entry)
        folder = sources[entry.name]
        if wants_quantizing(local, folder):
            path = quantized_path(local, folder, progress, lora=lora_enabled(local))
            local = local.model_copy(update={"model": path, "quantization": None})
        progress.stage(entry.name, "loading")
        engine = _build_local(local, draft, entry.num_speculative_tokens)
        progress.stage(entry.name, "ready")
        auto = local.generation_config == "auto"
        engine.sampling_defaults = sampling_defaults(folder) if auto else {}
        if engine.sampling_defaults:
            log.info("%s: requests that leave them out sample with the model's generation_config %s "
                     "(generation_config: none turns this off)", entry.name, engine.sampling_defaults)
        engines[entry.name] = engine
    from server.engines.torch.openmp import release_idle_team

    release_idle_team()  # this loading thread's OpenMP threads would slow the engines' steps
    return engines


def check_speculative(settings: ServeSettings, setting: str) -> None:
    """speculative_config refused at start where this engine cannot run it (named in the message)."""
    if not settings.speculative_config:
        return
    if settings.engine == "torch":
        speculation = torch_speculation(settings.speculative_config, setting)
        if settings.quantization and not isinstance(speculation, NgramConfig):  # before loading anything
            raise ConfigError(f"{setting}.method", f"the model is served quantized ({settings.quantization}); a "
                                                   "quantized copy drafts for a full-precision model")
    else:
        why = speculative_unsupported(vllm_speculative_config(settings.speculative_config))
        if why:
            raise ConfigError(setting, why)


_BOTH_ENGINES = ("quantization", "speculative_config", "enable_prefix_caching", "max_num_batched_tokens")


def lora_enabled(settings: ServeSettings) -> bool:
    return bool(settings.lora or settings.adapter_roots or settings.admin_key)


def _build_local(settings: ServeSettings, draft: str | None, num_speculative_tokens: int) -> Engine:
    path = resolve_model_path(settings)
    if settings.engine == "vllm":
        from server.engines.vllm_engine import VLLMEngine

        options = settings.vllm_options()
        if options.get("enable_prefix_caching"):  # on: vLLM's own default, which it turns off where unsupported
            del options["enable_prefix_caching"]
        if settings.quantization in VLLM_LOAD_TIME:  # slimserve's names for vLLM's own load-time methods
            options["quantization"] = VLLM_LOAD_TIME[settings.quantization]
        if draft:  # vLLM's draft-model speculative decoding
            options["speculative_config"] = {"method": "draft_model", "model": draft,
                                             "num_speculative_tokens": num_speculative_tokens}
        elif settings.speculative_config:  # ngram (prompt lookup) with slimserve's defaults, others as given
            options["speculative_config"] = vllm_speculative_config(settings.speculative_config)
        return VLLMEngine.load(
            settings.model_id, path, dtype=settings.dtype, max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs, max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
            options=options, trust_remote_code=settings.trust_remote_code,
            enable_lora=lora_enabled(settings),
        )
    vllm_only = {k for k in settings.vllm_options() if k not in _BOTH_ENGINES}
    if vllm_only:
        raise ConfigError(sorted(vllm_only)[0], "this setting applies to the vllm engine only")
    from server.engines.torch.engine import TorchEngine

    speculation = torch_speculation(settings.speculative_config)  # refused here, before loading, unless it runs
    lookup = speculation if isinstance(speculation, NgramConfig) else None  # quantized_self brings its own
    engine = TorchEngine.load(
        settings.model_id, path, dtype=settings.dtype, device=settings.device,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_prefill_tokens=settings.max_prefill_tokens, trust_remote_code=settings.trust_remote_code,
        quantization=settings.quantization, lookup=lookup, enable_prefix_caching=settings.enable_prefix_caching,
        prefix_cache_bytes=settings.prefix_cache_bytes, max_num_batched_tokens=settings.max_num_batched_tokens,
        prepack_weights=settings.prepack_weights, grouped_attention=settings.grouped_attention,
        compile_decode=settings.compile_decode, self_draft=None if lookup else speculation,
    )
    if draft:
        engine.attach_draft(draft, num_speculative_tokens)
    return engine
