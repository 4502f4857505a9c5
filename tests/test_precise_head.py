"""An fp32 model's quantized output head keeps fp32 logits (quantize_linears.precise_head): its int8 matmul
runs in fp32 on slimserve's own kernel at every row count, so the logits are the int8 weight's exact
products, not rounded to bf16 (where near ties between the top two tokens flip). A bf16 model, or a
machine where slimserve's kernel is off, keeps the measured kernel dtype as before."""

from __future__ import annotations

import pytest
import torch

from server.engines.torch import int8_gemv
from server.engines.torch.engine import TorchEngine
from server.engines.torch.int8_linear import Int8Linear
from server.engines.torch.quantize_linears import kernel_dtype

pytestmark = pytest.mark.skipif(int8_gemv.off_reason() is not None,
                                reason=f"slimserve's int8 kernel is off here: {int8_gemv.off_reason()}")


def _head(engine: TorchEngine) -> Int8Linear:
    head = engine.model.get_output_embeddings()
    assert isinstance(head, Int8Linear)
    return head


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_fp32_head_gives_fp32_logits_on_slimserves_kernel_at_every_row_count(tiny_model_dir, monkeypatch, method):
    head = _head(TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization=method))
    assert head.compute_dtype == torch.float32 and head.any_rows
    calls = []
    real = int8_gemv.gemv
    monkeypatch.setattr(int8_gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(0)
    for rows in (1, 4, 16):
        x = torch.randn(rows, head.in_features)
        with torch.no_grad():
            y = head(x)
        ref = x.double() @ head.dequantized().double().t()
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert (y != y.bfloat16().float()).any()  # not on bf16's grid
    assert calls == [1, 4, 16]


def test_bf16_model_and_kernel_off_keep_the_measured_head_dtype(tiny_model_dir, monkeypatch):
    head = _head(TorchEngine.load("tiny", tiny_model_dir, dtype="bfloat16", quantization="int4"))
    assert head.compute_dtype == kernel_dtype("int8") and not head.any_rows
    monkeypatch.setattr(int8_gemv, "enabled", False)
    head = _head(TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization="int4"))
    assert head.compute_dtype == kernel_dtype("int8") and not head.any_rows
