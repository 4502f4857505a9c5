"""`slimserve compress quantize`: GPTQ, AWQ, RTN and int8 artifacts.

Backends: GPTQModel (default) quantizes on CPUs and writes checkpoints that transformers and vLLM
load directly (GPTQ/RTN as `gptq`, AWQ as `awq` GEMM); `autoround` runs Intel's auto-round (SignRound:
signed-gradient rounding and clipping tuned block by block) and writes the same GPTQ layout. AutoGPTQ, which the owner named, is
unmaintained and needs CUDA; its maintainers point to GPTQModel. llm-compressor, vLLM's own tool,
writes compressed-tensors (W4A16 groups, W8A8 int8) that vLLM loads natively; its pins clash with
vLLM's, so it runs in its own virtual environment (compress/requirements-llmcompressor.txt), as a
subprocess. Everything that can be checked is checked before the (minutes-long) work starts.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from compress.calibration import calibration_texts
from compress.data import DataError
from compress.manifest import file_hash, write_manifest

METHODS = ("gptq", "awq", "rtn", "int8", "autoround")
CALIBRATED = ("gptq", "awq", "autoround")  # methods that need calibration text
MODULE_BITS = (2, 3, 4, 8)  # what a per-module override may ask for (GPTQ layout, packed in int32)
BACKENDS = ("gptqmodel", "llmcompressor")
SELF = "self"  # --calib self: the model writes its own calibration text (compress/self_calibration.py)
# progress(stage, done, total): stages "calibrating" (samples written) and "quantizing" (decoder layers)
Progress = Callable[[str, int, int], None]


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
    calib: Path | str | None = None  # a .txt/.jsonl file, or "self"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    mse: float = 0.0  # GPTQ: >0 searches each group's clipping range, minimising sum |w - q|^mse (2.4 in GPTQ's code)
    module_bits: dict[str, int] | None = None  # exact module names -> bits (e.g. 8), overriding `bits`
    iters: int = 50  # autoround: SignRound steps per decoder block (its default 200 is slow on CPUs)
    # awq: GPTQModel's clipping fit cost SmolLM2 +62.5% ppl vs +24.7% without it (docs/quantization.md),
    # so it is off unless asked for; scale 1 joins the scale search (compress/awq_options.py)
    awq_clip: bool = False
    awq_scale_one: bool = True


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
        if spec.method == "awq":
            raise QuantizeError("llm-compressor's AWQ needs an accelerator (it pins memory); use "
                                "--backend gptqmodel for AWQ on CPUs")
        if not llmcompressor_python().is_file():
            raise QuantizeError(f"the llmcompressor backend runs in its own environment, not found at "
                                f"{llmcompressor_python()}; build it with: python3 -m venv .venv-llmcompressor && "
                                f".venv-llmcompressor/bin/pip install -r compress/requirements-llmcompressor.txt "
                                f"(or set SLIMSERVE_LLMCOMPRESSOR_PYTHON)")
    bits = 8 if spec.method == "int8" else spec.bits
    if bits not in (2, 3, 4, 8):
        raise QuantizeError(f"bits must be 2, 3, 4 or 8, not {bits}")
    if spec.method == "awq" and bits != 4:
        raise QuantizeError("AWQ checkpoints are 4-bit")
    if spec.mse and (spec.method != "gptq" or spec.backend != "gptqmodel" or spec.mse < 1):
        raise QuantizeError("mse (the clipping search's error norm, e.g. 2.4) applies to --method gptq on the "
                            "gptqmodel backend and must be at least 1")
    if spec.method != "awq" and spec.awq_clip:
        raise QuantizeError("awq_clip applies to --method awq")
    if spec.method == "autoround" and spec.backend != "gptqmodel":
        raise QuantizeError("autoround runs in-process; drop --backend")
    if spec.method == "autoround" and spec.iters < 0:
        raise QuantizeError("iters must be >= 0 (0: auto-round's tuned RTN)")
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
    if spec.module_bits:
        _check_module_bits(spec, bits)
    if spec.out.exists() and any(spec.out.iterdir()):
        raise QuantizeError(f"{spec.out} exists and is not empty")
    texts: list[str] = []
    if spec.method in CALIBRATED:
        if spec.calib is None:
            raise QuantizeError(f"{spec.method} needs calibration text: --calib FILE (.txt or .jsonl) or --calib self")
        if spec.calib != SELF:  # self-written text is made later: it is work, not a check
            try:
                texts = calibration_texts(Path(spec.calib), spec.num_samples, spec.seed)
            except DataError as exc:
                raise QuantizeError(str(exc)) from None
    return config, texts


def _check_module_bits(spec: QuantizeSpec, bits: int) -> None:
    """Per-module bits name real linear layers and bits the GPTQ layout can pack."""
    from compress.bit_cost import read_header

    if spec.backend != "gptqmodel" or spec.method not in ("gptq", "rtn", "autoround"):
        raise QuantizeError("module_bits applies to gptq, rtn and autoround on the gptqmodel backend")
    weights = set()
    for f in spec.model.glob("*.safetensors"):
        weights |= {n[: -len(".weight")] for n, e in read_header(f).items()
                    if n.endswith(".weight") and len(e["shape"]) == 2}
    for name, b in spec.module_bits.items():
        if b not in MODULE_BITS:
            raise QuantizeError(f"module_bits[{name!r}] must be one of {MODULE_BITS}, not {b}")
        if name not in weights:
            raise QuantizeError(f"module_bits names {name!r}, which is no linear layer of {spec.model} "
                                f"(names look like model.layers.0.mlp.down_proj)")
        if name.endswith(("lm_head", "embed_tokens")):
            raise QuantizeError(f"module_bits: {name} is not quantized by these backends")


def dynamic_overrides(module_bits: dict[str, int] | None) -> dict | None:
    """GPTQModel's per-module `dynamic` config: `+:` regexes matched against full module names,
    anchored so that `layers.1.` never also catches `layers.11.`. It lands in config.json, where
    transformers (via GPTQModel) and vLLM's gptq loader read the per-module bits back."""
    if not module_bits:
        return None
    return {f"+:^{re.escape(name)}$": {"bits": b} for name, b in sorted(module_bits.items())}


def calibration_identity(spec: QuantizeSpec) -> str | None:
    """What the calibration text is, for cache keys and manifests: None (none used), the file's
    sha256, or self-calibration's version (the texts follow from the model, the seed and the recipe)."""
    if spec.method not in CALIBRATED or spec.calib is None:
        return None
    if spec.calib == SELF:
        from compress.self_calibration import VERSION

        return f"self-v{VERSION}"
    return file_hash(Path(spec.calib))


def llmcompressor_python() -> Path:
    configured = os.environ.get("SLIMSERVE_LLMCOMPRESSOR_PYTHON")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1] / ".venv-llmcompressor" / "bin" / "python"


def _run_llmcompressor(spec: QuantizeSpec, bits: int, texts: list[str], out: Path) -> None:
    import json
    import subprocess
    import tempfile

    job = {"model": str(spec.model), "out": str(out), "method": spec.method, "bits": bits,
           "group_size": spec.group_size, "sym": spec.sym, "seq_len": spec.seq_len, "texts": texts}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    script = Path(__file__).with_name("llmcompressor_job.py")
    done = subprocess.run([str(llmcompressor_python()), str(script), f.name], env={**os.environ})
    Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor failed (exit {done.returncode}); its output is above")


def quantize(spec: QuantizeSpec, progress: Progress | None = None) -> dict:
    """The one entry point, offline (`compress quantize`) and at load time (server/quantize_at_load.py):
    the same spec gives the same artifact either way."""
    _, texts = check(spec)
    if spec.calib == SELF and spec.method in CALIBRATED:
        from compress.self_calibration import self_calibration_texts

        if progress:
            progress("calibrating", 0, spec.num_samples)
        texts = self_calibration_texts(spec.model, spec.num_samples, spec.seq_len, spec.seed,
                                       progress=(lambda i, n: progress("calibrating", i, n)) if progress else None)
    if progress:
        progress("quantizing", 0, 0)  # the layer count comes with the first block GPTQModel reaches
    if spec.backend == "llmcompressor":
        return _finish(spec, texts, lambda out, bits: _run_llmcompressor(spec, bits, texts, out))
    if spec.method == "autoround":
        from compress.autoround_backend import run_autoround

        return _finish(spec, texts, lambda out, bits: run_autoround(spec, bits, texts, out))
    return _finish(spec, texts, lambda out, bits: _run_gptqmodel(spec, bits, texts, out, progress))


def _report_layers(model, progress: Progress):
    """Forward pre-hooks on the decoder blocks: GPTQModel quantizes block by block, running each
    block on the calibration activations as it goes, so the highest block seen is the progress."""
    import torch

    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    if not blocks:
        return []
    seen = [0]

    def hook(index):
        def on_forward(_module, _args):
            if index + 1 > seen[0]:
                seen[0] = index + 1
                progress("quantizing", index + 1, len(blocks))
        return on_forward

    return [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]


def _run_gptqmodel(spec: QuantizeSpec, bits: int, texts: list[str], out: Path,
                   progress: Progress | None = None) -> dict | None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel import AWQConfig, GPTQConfig, RTNConfig
    from transformers import AutoTokenizer

    if texts:  # GPTQModel tokenizes itself; cut samples to --seq-len tokens first
        tok = AutoTokenizer.from_pretrained(spec.model)
        texts = [tok.decode(tok.encode(t, add_special_tokens=False)[: spec.seq_len]) for t in texts]
    if spec.method == "gptq":
        qcfg = GPTQConfig(bits=bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.act_order,
                          mse=spec.mse, dynamic=dynamic_overrides(spec.module_bits))
    elif spec.method == "awq":
        qcfg = AWQConfig(bits=bits, group_size=spec.group_size, sym=spec.sym)
    else:  # rtn, int8: round to nearest, no calibration
        qcfg = RTNConfig(bits=bits, group_size=spec.group_size, sym=spec.sym,
                         dynamic=dynamic_overrides(spec.module_bits))
    model = GPTQModel.load(str(spec.model), qcfg)
    hooks = _report_layers(model.model, progress) if progress else []
    notes = None
    if spec.method == "awq":
        from compress.awq_options import awq_options

        with awq_options(clip=spec.awq_clip, scale_one=spec.awq_scale_one) as notes:
            model.quantize(texts, batch_size=1, backend=BACKEND.AWQ_TORCH)  # GPTQModel's AWQ needs this without CUDA
    elif texts:
        model.quantize(texts, batch_size=1)
    else:
        model.quantize(calibration=None)
    for h in hooks:
        h.remove()
    model.save(str(out))
    return notes


def _bits_or_none(count, folder: Path) -> dict | None:
    """The size count is a report, not the artifact: a layout it cannot read leaves it empty."""
    try:
        return count(folder)
    except (KeyError, ValueError):
        return None


def _finish(spec: QuantizeSpec, texts: list[str], run) -> dict:
    """Run a backend into a temporary folder, add the manifest, then move it into place."""
    bits = 8 if spec.method == "int8" else spec.bits
    tmp = spec.out.with_name(f".{spec.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        notes = run(tmp, bits)  # what the backend reports beyond its artifact, if anything
    except BaseException:  # an error, full disk or Ctrl-C leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    before = sum(f.stat().st_size for f in spec.model.glob("*.safetensors"))
    after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items() if k not in ("model", "out")}
    from compress.bit_cost import artifact_bits
    report = {
        "source_model": str(spec.model), "method": spec.method, "backend": spec.backend, "bits": bits,
        "parameters": params, "calibration": ("self" if spec.calib == SELF else str(spec.calib)) if texts else None,
        "calibration_sha256": file_hash(Path(spec.calib)) if texts and spec.calib != SELF else None,
        "calibration_samples": len(texts), "bytes_before": before, "bytes_after": after,
        "ratio": round(after / before, 4) if before else None, "seconds": round(seconds, 1),
        "module_bits": spec.module_bits or {}, "bits_per_weight": _bits_or_none(artifact_bits, tmp),
    }
    if notes:
        report["backend_notes"] = notes
    write_manifest(tmp, "quantized-model", **report)
    if spec.out.exists():
        spec.out.rmdir()  # empty, checked above
    os.replace(tmp, spec.out)
    return report
