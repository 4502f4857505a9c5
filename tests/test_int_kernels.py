"""torch's packed CPU kernels for load-time int8/int4 (server/engines/torch/int8_linear.py,
int4_linear.py, quantize_linears.py): each layer's output equals the matmul by its dequantized
weight, in both activation dtypes; the swap reaches every linear (the head too), q/k/v and gate/up
joined into one quantized matmul each that equals its members quantized alone, and LoRA still wraps
the decoder's."""

from __future__ import annotations

import pytest
import torch

from server.engines.torch import fused_projections
from server.engines.torch.fused_projections import SharedProjection
from server.engines.torch.int4_linear import GROUP_SIZES, Int4Linear, dequantize_int4_groups, quantize_int4_groups
from server.engines.torch.int8_linear import Int8Linear, quantize_int8_per_channel
from server.engines.torch.quantize_linears import kernel_dtype, quantize_linears

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative to the output's scale


def _layer(in_f: int = 256, out_f: int = 96, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"{dtype}: max error {err:.3g} vs scale {ref.abs().max():.3g}"


def test_int8_per_channel_math():
    w = _layer().weight.detach()
    q, scales = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (w.shape[0],)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()  # round to nearest
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7])
def test_int8_kernel_matches_dequantized_matmul(dtype, rows):
    layer = _layer()
    q8 = Int8Linear.from_linear(layer, dtype)
    x = torch.randn(rows, 3, layer.in_features)  # a leading batch dim, flattened inside
    with torch.no_grad():
        ref = x.reshape(-1, layer.in_features).to(dtype).float() @ q8.dequantized().t() + q8.bias.float()
        y = q8(x)
    assert y.shape == (rows, 3, layer.out_features) and y.dtype == x.dtype
    _close(y.reshape(-1, layer.out_features), ref, dtype)
    _close(y.reshape(-1, layer.out_features), layer(x).detach().reshape(-1, layer.out_features), torch.bfloat16)


def test_int4_group_math():
    w = _layer().weight.detach()
    q, scales, zeros = quantize_int4_groups(w, 32)
    assert q.min() >= 0 and q.max() <= 15 and scales.shape == (w.shape[0], w.shape[1] // 32)
    deq = dequantize_int4_groups(q, scales, zeros)
    step = scales.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_int4_groups(w, 48)
    assert 32 in GROUP_SIZES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 128])
def test_int4_kernel_matches_dequantized_matmul(dtype, group):
    layer = _layer()
    q4 = Int4Linear.from_linear(layer, group, dtype)
    q, scales, zeros = quantize_int4_groups(layer.weight, group)
    # the packed weights multiply as our pure dequantization says (the kernel's zero-point convention),
    # with the scales and zeros the kernel holds in the activation dtype
    deq = dequantize_int4_groups(q, scales.to(dtype).float(), zeros.to(dtype).float())
    atol = deq.abs().max().item() * 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert (q4.dequantized() - deq).abs().max().item() <= atol
    for rows in (1, 9):
        x = torch.randn(rows, layer.in_features)
        with torch.no_grad():
            ref = x.to(dtype).float() @ dequantize_int4_groups(q, scales, zeros).t() + layer.bias.detach()
            y = q4(x)
        assert y.dtype == x.dtype
        _close(y, ref, dtype)


def test_kernel_dtype_is_measured_once():
    assert kernel_dtype("int8") in DTYPES and kernel_dtype("int4") in DTYPES
    assert kernel_dtype.cache_info().currsize >= 2


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_swap_reaches_every_linear_and_lora_wraps_them(tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    from server.engines.torch.lora import LoRAManager

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        before = model(ids).logits
        summary = quantize_linears(model, method)
        after = model(ids).logits
    kind = Int8Linear if method == "int8" else Int4Linear
    assert summary["quantized"] == n_linear and summary["kept"] == 0
    assert summary["fused"] == 2 * model.config.num_hidden_layers and "fused" in summary["kernel"]
    assert summary["kernel"].startswith("aten._weight_int8pack_mm" if method == "int8" else "aten._weight_int4pack")
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear)  # the head stays 8-bit under int4 too
    assert after.dtype == before.dtype and not torch.equal(after, before)
    # the tiny model's sharp random weights make 4-bit lossy (see test_load_time_quant.py); unrelated ~0
    assert torch.corrcoef(torch.stack([after.flatten(), before.flatten()]))[0, 1] > (0.99 if method == "int8" else 0.7)
    lora = LoRAManager(model, dtype=torch.float32)
    per_block = 7  # q k v o gate up down
    assert len(lora.layers) == per_block * model.config.num_hidden_layers
    bases = [w.base._group[0].layer if isinstance(w.base, SharedProjection) else w.base for w in lora.layers.values()]
    assert all(isinstance(b, kind) for b in bases)
    assert sum(isinstance(w.base, SharedProjection) for w in lora.layers.values()) == 5 * model.config.num_hidden_layers
    assert lora.base_shapes()["model.layers.0.mlp.down_proj"] == (256, 128)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_groups_equal_their_members_quantized_alone(tiny_model_dir, method, dtype, monkeypatch):
    """Each output row is quantized on its own (int8: a scale a row; int4: groups along a row), so joining
    q/k/v and gate/up before quantizing changes no weight: the logits match the unfused model's."""
    from transformers import AutoModelForCausalLM

    from compress.load_time import weight_bytes

    ids = torch.tensor([[1, 5, 9, 30, 2, 7, 11]])
    fused = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    alone = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        quantize_linears(fused, method, compute_dtype=dtype)
        monkeypatch.setattr(fused_projections, "GROUPS", ())
        assert quantize_linears(alone, method, compute_dtype=dtype)["fused"] == 0
        q_fused = fused.model.layers[0].self_attn.q_proj
        assert isinstance(q_fused, SharedProjection)
        assert (q_fused._group[0].layer.dequantized()[:q_fused.out_features]
                == alone.model.layers[0].self_attn.q_proj.dequantized()).all()
        a, b = fused(ids).logits, alone(ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), "another summation order at most"
    assert abs(weight_bytes(fused) - weight_bytes(alone)) <= 64  # the group's bytes are counted, once


def test_int8_layers_whose_width_torchs_bf16_kernel_crashes_on_stay_full_precision():
    """torch 2.13's bf16 _weight_int8pack_mm segfaults on some input widths that are not a multiple of 16
    (in 100 at 3 rows here): such a layer keeps its full-precision weights instead of taking the process down."""
    model = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.Linear(64, 7))
    with torch.no_grad():
        summary = quantize_linears(model, "int8", compute_dtype=torch.bfloat16)
        y = model(torch.randn(3, 100))
    assert summary["kept"] == 1 and summary["quantized"] == 1
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], Int8Linear)
    assert y.shape == (3, 7)
