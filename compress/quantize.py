"""`slimserve compress quantize`: GPTQ, AWQ and RTN artifacts through GPTQModel.

GPTQModel is the default (and, here, only installed) backend: it quantizes on CPUs and writes
checkpoints that transformers and vLLM load directly (GPTQ/RTN as `gptq`, AWQ as `awq` GEMM).
AutoGPTQ, which the owner named, is unmaintained and needs CUDA; its maintainers point to
GPTQModel. Everything that can be checked is checked before the (minutes-long) work starts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.calibration import calibration_texts
from compress.data import DataError
from compress.manifest import file_hash, write_manifest

METHODS = ("gptq", "awq", "rtn", "int8")
BACKENDS = ("gptqmodel", "llmcompressor")


class QuantizeError(ValueError):
    """Bad input, found before any work starts; the message says what to change."""


@dataclass
class QuantizeSpec:
    model: Path
    out: Path
    method: str = "gptq"
    backend: str = "gptqmodel"
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    calib: Path | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0


def linear_widths(config) -> dict[str, int]:
    """Input widths of the decoder's linear layers, which a group size must divide."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"hidden_size": text.hidden_size, "attention output (heads x head_dim)": heads * head_dim,
            "intermediate_size": text.intermediate_size}


def check(spec: QuantizeSpec) -> tuple[object, list[str]]:
    """Validate everything up front; returns (config, calibration texts)."""
    from transformers import AutoConfig

    if spec.method not in METHODS:
        raise QuantizeError(f"method must be one of {', '.join(METHODS)}, not {spec.method!r}")
    if spec.backend not in BACKENDS:
        raise QuantizeError(f"backend must be one of {', '.join(BACKENDS)}, not {spec.backend!r}")
    if spec.backend == "llmcompressor":
        raise QuantizeError("the llmcompressor backend is not available in this release: its pins "
                            "(compressed-tensors 0.19, transformers<=5.17) need a separate environment, "
                            "which slimserve does not build yet; use --backend gptqmodel")
    bits = 8 if spec.method == "int8" else spec.bits
    if bits not in (2, 3, 4, 8):
        raise QuantizeError(f"bits must be 2, 3, 4 or 8, not {bits}")
    if spec.method == "awq" and bits != 4:
        raise QuantizeError("AWQ checkpoints are 4-bit")
    if not (spec.model / "config.json").is_file():
        raise QuantizeError(f"{spec.model} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(spec.model)
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise QuantizeError(f"{spec.model} is not a causal language model (architectures: {config.architectures})")
    if getattr(config, "quantization_config", None):
        raise QuantizeError(f"{spec.model} is already quantized")
    if spec.group_size != -1:
        if spec.group_size < 16:
            raise QuantizeError("group size must be at least 16, or -1 for one group per row")
        bad = {name: w for name, w in linear_widths(config).items() if w % spec.group_size}
        if bad:
            name, width = next(iter(bad.items()))
            fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in linear_widths(config).values())]
            raise QuantizeError(f"group size {spec.group_size} does not divide the {name} ({width}); "
                                f"use {fits[-1] if fits else -1}")
    if spec.out.exists() and any(spec.out.iterdir()):
        raise QuantizeError(f"{spec.out} exists and is not empty")
    texts: list[str] = []
    if spec.method in ("gptq", "awq"):
        if spec.calib is None:
            raise QuantizeError(f"{spec.method} needs calibration text: --calib FILE (.txt or .jsonl)")
        try:
            texts = calibration_texts(spec.calib, spec.num_samples, spec.seed)
        except DataError as exc:
            raise QuantizeError(str(exc)) from None
    return config, texts


def quantize(spec: QuantizeSpec) -> dict:
    config, texts = check(spec)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel import AWQConfig, GPTQConfig, RTNConfig
    from transformers import AutoTokenizer

    bits = 8 if spec.method == "int8" else spec.bits
    if texts:  # GPTQModel tokenizes itself; cut samples to --seq-len tokens first
        tok = AutoTokenizer.from_pretrained(spec.model)
        texts = [tok.decode(tok.encode(t, add_special_tokens=False)[: spec.seq_len]) for t in texts]
    started = time.perf_counter()
    if spec.method == "gptq":
        qcfg = GPTQConfig(bits=bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.act_order)
    elif spec.method == "awq":
        qcfg = AWQConfig(bits=bits, group_size=spec.group_size, sym=spec.sym)
    else:  # rtn, int8: round to nearest, no calibration
        qcfg = RTNConfig(bits=bits, group_size=spec.group_size, sym=spec.sym)
    model = GPTQModel.load(str(spec.model), qcfg)
    if spec.method == "awq":
        model.quantize(texts, batch_size=1, backend=BACKEND.AWQ_TORCH)  # GPTQModel's AWQ needs this without CUDA
    elif texts:
        model.quantize(texts, batch_size=1)
    else:
        model.quantize(calibration=None)
    tmp = spec.out.with_name(f".{spec.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    seconds = time.perf_counter() - started
    before = sum(f.stat().st_size for f in spec.model.glob("*.safetensors"))
    after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items() if k not in ("model", "out")}
    report = {
        "source_model": str(spec.model), "method": spec.method, "backend": spec.backend, "bits": bits,
        "parameters": params, "calibration_sha256": file_hash(spec.calib) if texts else None,
        "calibration_samples": len(texts), "bytes_before": before, "bytes_after": after,
        "ratio": round(after / before, 4) if before else None, "seconds": round(seconds, 1),
    }
    write_manifest(tmp, "quantized-model", **report)
    if spec.out.exists():
        spec.out.rmdir()  # empty, checked above
    os.replace(tmp, spec.out)
    return report
