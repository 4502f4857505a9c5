"""Loading GPTQ artifacts whose layers have different bits (GPTQModel's per-module `dynamic`).

transformers loads GPTQ through optimum, which builds every layer at the config's top-level bits
and so cannot read an 8-bit layer of a mixed-precision artifact. Until it can, such an artifact
loads dequantized: the exact weights `scales[g_idx] * (q - zero)` of every layer
(compress/gptq_layout.py) in a plain model of the given dtype. The outputs are the artifact's; the
memory is that of the dtype, not of the packed codes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def is_mixed_gptq(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return bool(qc) and qc.get("quant_method") == "gptq" and bool(qc.get("dynamic"))


def load_dequantized(folder: Path, dtype: torch.dtype) -> nn.Module:
    from compress.quant_recovery import fake_quant_layers, load_trainable

    model = load_trainable(Path(folder), train_scales=False)
    for name, layer in fake_quant_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(layer.quantized_weight())
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model.to(dtype).eval()
