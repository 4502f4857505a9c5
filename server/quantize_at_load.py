"""`serve --quantization gptq|awq|rtn` on a full-precision model: the same code as `compress
quantize`, run as the server loads, into the shared cache (compress/quant_cache.py); the engine is
then handed the artifact's folder. Everything that can be refused is refused by `check` before any
work starts, in the settings' error style."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.quant_cache import check_writable, ensure
from compress.quantize import SELF, QuantizeError, QuantizeSpec, check as check_spec, linear_widths
from server.errors import ConfigError
from server.load_progress import LoadProgress
from server.settings import ServeSettings

log = logging.getLogger(__name__)
CALIBRATED = ("gptq", "awq", "rtn")  # calibration-free int8/int4/nf4/fp8 are compress/load_time.py's
SEQ_LEN = 256
# what each recipe's artifact declares in its config.json (GPTQModel writes RTN in the GPTQ format)
ARTIFACT_METHOD = {"gptq": "gptq", "rtn": "gptq", "awq": "awq"}


def wants_quantizing(settings: ServeSettings, source: str) -> bool:
    """A calibrated method asked for; except that vLLM keeps its meaning of `--quantization gptq` (or
    awq) on a checkpoint already in that format: read it as it is."""
    if settings.quantization not in CALIBRATED:
        return False
    return not (settings.engine == "vllm" and _quant_method_of(source) == settings.quantization)


def spec_for(settings: ServeSettings, source: str) -> QuantizeSpec:
    """The recipe the settings ask for, with `out` left for the cache to fill."""
    from transformers import AutoConfig

    group = settings.quant_group_size
    if group is None:  # the largest usual group that divides every linear layer of this model
        widths = linear_widths(AutoConfig.from_pretrained(source)).values()
        group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), -1)
    calib: Path | str | None = None
    if settings.quantization in ("gptq", "awq"):
        calib = SELF if settings.calib == SELF else Path(settings.calib).expanduser()
    return QuantizeSpec(model=Path(source), out=Path("/nonexistent"), method=settings.quantization,
                        bits=settings.quant_bits, group_size=group, sym=settings.quantization != "awq",
                        calib=calib, num_samples=settings.calib_samples, seq_len=SEQ_LEN)


def check(settings: ServeSettings, source: str, *, lora: bool) -> QuantizeSpec:
    """Every refusal, before any work: the recipe (bits, group size, calibration file), a model that
    is already quantized, a method this engine cannot serve on this machine, an unwritable cache."""
    prequantized = _quant_method_of(source)
    if prequantized:
        raise ConfigError("quantization", f"{source} is already quantized ({prequantized}); serve it without "
                                          f"--quantization, or quantize its full-precision original")
    spec = spec_for(settings, source)
    try:
        check_spec(spec)
    except QuantizeError as exc:
        raise ConfigError("quantization", str(exc)) from None
    if settings.engine == "vllm":
        from server.engines.vllm_kernels import missing_for

        if settings.dtype == "float32":  # vLLM's GPTQ and AWQ layers take 16-bit activations only
            raise ConfigError("dtype", f"the vLLM engine serves {spec.method} weights in float16 or bfloat16, not "
                                       f"float32; use --dtype auto or bfloat16 (the PyTorch engine takes float32)")

        declared = {"quant_method": ARTIFACT_METHOD[spec.method], "bits": spec.bits, "group_size": spec.group_size,
                    "sym": spec.sym}
        missing = missing_for(None, {"quantization_config": declared}, lora=lora)
        if missing:
            raise ConfigError("quantization", f"{spec.method} {spec.bits}-bit would be made but not served: "
                                              f"{missing}")
    try:
        check_writable(settings.cache_dir)
    except OSError as exc:
        raise ConfigError("cache_dir", f"quantized models are cached in {settings.cache_dir}/quantized, which "
                                       f"cannot be written: {exc.strerror or exc}") from None
    return spec


def quantized_path(settings: ServeSettings, source: str, progress: LoadProgress, *, lora: bool) -> str:
    """The cached artifact for this model and recipe, quantized now when no server made it before."""
    spec = check(settings, source, lora=lora)
    model = settings.model_id
    progress.stage(model, "hashing the weights for the cache key")

    def report(stage: str, done: int, total: int) -> None:
        progress.stage(model, stage, done, total)

    folder, made = ensure(spec, settings.cache_dir, report,
                          on_wait=lambda: progress.stage(model, "waiting for another server quantizing"))
    log.info("%s: %s %s", model, "quantized into" if made else "reusing the cached", folder)
    return str(folder)


def _quant_method_of(source: str) -> str | None:
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # resolve_model already refused folders without a readable config
    qc = config.get("quantization_config")
    return (qc.get("quant_method") or "quantized") if isinstance(qc, dict) else None
