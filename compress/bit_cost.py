"""Bits per weight: what a quantized model really stores, and what a plan will store.

Every quality figure of a quantized model comes with its size, counted the same way for every
method: the bits of everything a quantized linear layer stores (packed weights, scales, zero
points, GPTQ's `g_idx`) divided by its weights. `artifact_bits` reads the safetensors headers of
a folder (GPTQ and AWQ layouts: `qweight` + `scales` + `qzeros` [+ `g_idx`]); `planned_bits` is the
same count before quantizing, used to fit a bit budget (compress/bit_budget.py).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def planned_bits(bits: int, group_size: int, in_features: int, out_features: int, g_idx: bool = True) -> float:
    """Stored bits per weight of one GPTQ-layout linear: packed weights, an fp16 scale and a packed
    zero point per group and output row, and an int32 group index per input column."""
    groups = 1 if group_size <= 0 else in_features // group_size
    total = bits * in_features * out_features + groups * out_features * (16 + bits)
    if g_idx:
        total += 32 * in_features
    return total / (in_features * out_features)


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


@dataclass
class ModuleBits:
    name: str
    weights: int
    stored_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights


def _tensor_bits(entry: dict) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n * DTYPE_BITS[entry["dtype"]]


def _numel(entry: dict) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n


def _awq_layout(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return (config.get("quantization_config") or {}).get("quant_method") == "awq"


def linear_modules(folder: Path) -> list[ModuleBits]:
    """The decoder blocks' linear layers (`.layers.N.` 2-D weights or quantized modules) of a folder."""
    header: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        header.update(read_header(f))
    awq = _awq_layout(Path(folder))
    modules: list[ModuleBits] = []
    for name, entry in header.items():
        if ".layers." not in name:
            continue
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            parts = {p: header[f"{prefix}.{p}"] for p in QUANT_PARTS if f"{prefix}.{p}" in header}
            out_features = parts["scales"]["shape"][-1]
            if awq:  # AWQ packs along the output dimension: qweight [in, out * bits / 32]
                in_features = entry["shape"][0]
            elif "g_idx" in parts:
                in_features = parts["g_idx"]["shape"][0]
            else:
                raise ValueError(f"{prefix}: cannot tell the input width (no g_idx)")
            modules.append(ModuleBits(prefix, in_features * out_features, sum(_tensor_bits(p) for p in parts.values())))
        elif name.endswith(".weight") and len(entry["shape"]) == 2:
            modules.append(ModuleBits(name[: -len(".weight")], _numel(entry), _tensor_bits(entry)))
    return sorted(modules, key=lambda m: m.name)


def artifact_bits(folder: Path) -> dict:
    """Bits per weight of the decoder's linear layers and of the whole model (every stored tensor
    over every weight: embeddings, norms and a separate head included)."""
    folder = Path(folder)
    modules = linear_modules(folder)
    header: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        header.update(read_header(f))
    quantized = {m.name for m in modules if f"{m.name}.qweight" in header}
    all_bits = sum(_tensor_bits(e) for e in header.values())
    weights = sum(m.weights for m in modules)
    other = sum(_numel(e) for n, e in header.items()
                if not any(n.startswith(q + ".") for q in quantized) and not n.endswith(".qweight"))
    other -= sum(m.weights for m in modules if m.name not in quantized)
    return {
        "linear": round(sum(m.stored_bits for m in modules) / weights, 4) if weights else None,
        "model": round(all_bits / (weights + other), 4) if weights + other else None,
        "linear_weights": weights,
        "model_weights": weights + other,
    }
