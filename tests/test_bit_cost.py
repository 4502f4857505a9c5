"""Bits per weight as stored: a GPTQ artifact's count equals the layout's formula."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file

from compress.bit_cost import artifact_bits, planned_bits


def test_planned_bits_counts_scales_zeros_and_g_idx():
    # 4 bits + (fp16 scale + 4-bit zero) per 64 weights + an int32 g_idx per input column
    assert planned_bits(4, 64, 576, 576) == 4 + 20 / 64 + 32 / 576
    assert planned_bits(8, -1, 128, 64, g_idx=False) == 8 + 24 / 128


def test_artifact_bits_reads_gptq_layout(tmp_path):
    inp, out, g = 128, 64, 32
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.zeros(inp * 4 // 32, out, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.qzeros": torch.zeros(inp // g, out * 4 // 32, dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.zeros(inp // g, out, dtype=torch.float16),
        "model.layers.0.mlp.down_proj.g_idx": torch.zeros(inp, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(out, inp, dtype=torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.zeros(inp, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.zeros(10, inp, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    bits = artifact_bits(tmp_path)
    quant = planned_bits(4, g, inp, out) * inp * out
    assert bits["linear_weights"] == 2 * inp * out
    assert abs(bits["linear"] - (quant + 16 * inp * out) / (2 * inp * out)) < 1e-3
    assert bits["model_weights"] == 2 * inp * out + inp + 10 * inp
    assert abs(bits["model"] - (quant + 16 * (inp * out + inp + 10 * inp)) / bits["model_weights"]) < 1e-3
