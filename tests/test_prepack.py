"""oneDNN-prepacked linears (#19 item 2): the layer equals nn.Linear, the engine's greedy outputs with
prepacked weights equal the plain engine's (fp32 and bf16, batched rows, a LoRA adapter), nothing is
swapped where the load-time probe measures no gain, and the packed bytes are counted."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from adapter_factory import make_adapter
from adapters.loader import load_lora
from compress.load_time import weight_bytes
from engine_run import greedy_tokens
from server.engines.torch import prepack
from server.engines.torch.engine import TorchEngine
from server.engines.torch.onednn_linear import OneDNNLinear, can_pack

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")

# oneDNN refuses to pack bf16 on AVX2-only CPUs (the load-time probe then keeps nn.Linear, tested below)
BF16 = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN cannot pack bf16 weights on this CPU "
                          "(needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); the engine keeps nn.Linear for bf16 here")

ITEMS = [(p, adapter) for p in ("Hello, world!", "Numbers: 1 2 3 4", "The quick brown fox") for adapter in (None, "a")]


@pytest.fixture()
def always_pays(monkeypatch):
    """The swap itself under test on every CPU: the probe's verdict is fixed to a gain."""
    monkeypatch.setattr(prepack, "packed_gain", lambda dtype: 2.0)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("prepack-lora") / "a", seed=3, rank=8)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
def test_layer_equals_nn_linear(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True, dtype=dtype)
    packed = OneDNNLinear.from_linear(linear)
    x = torch.randn(2, 5, 96, dtype=dtype)
    with torch.no_grad():
        want, got = linear(x), packed(x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert packed.extra_weight_bytes == linear.weight.numel() * linear.weight.element_size()


def _outputs(folder, adapter_dir, dtype: str, prepack_weights: bool) -> tuple[list[list[int]], TorchEngine]:
    engine = TorchEngine.load("tiny", folder, dtype=dtype, prepack_weights=prepack_weights)
    asyncio.run(engine.start())
    try:
        asyncio.run(engine.install_adapter(load_lora("a", adapter_dir, engine.base_shapes(), max_rank=64)))
        return greedy_tokens(engine, ITEMS) + [greedy_tokens(engine, [i])[0] for i in ITEMS], engine
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=BF16)])
def test_prepacked_engine_outputs_equal_plain(tiny_model_dir, adapter_dir, dtype, always_pays):
    plain, plain_engine = _outputs(tiny_model_dir, adapter_dir, dtype, prepack_weights=False)
    packed, engine = _outputs(tiny_model_dir, adapter_dir, dtype, prepack_weights=True)
    assert engine.linear_kernel and "oneDNN" in engine.linear_kernel and plain_engine.linear_kernel is None
    linears = [m for m in engine.model.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)  # the output head included
    assert plain[0] != plain[1], "the adapter should change the output"
    assert packed == plain


def test_nothing_swapped_where_the_probe_measures_no_gain(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(prepack, "packed_gain", lambda dtype: 1.02)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    assert engine.linear_kernel is None
    assert not any(isinstance(m, OneDNNLinear) for m in engine.model.modules())


def test_packed_bytes_counted_and_a_tied_head_gets_its_own_copy(tiny_model_dir, always_pays):
    plain = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", prepack_weights=False)
    packed = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    head = plain.model.get_output_embeddings()
    tied = head.weight.data_ptr() == plain.model.get_input_embeddings().weight.data_ptr()
    extra = head.weight.numel() * head.weight.element_size() if tied else 0
    assert packed.weight_bytes == plain.weight_bytes + extra


def test_models_card_names_the_linear_kernel(tiny_model_dir, always_pays):
    from server.routes.models import _dtype_fields

    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    assert "oneDNN prepacked" in _dtype_fields(engine)["linear_kernel"]


def test_the_probe_runs_here():
    """The real measurement: a ratio for both dtypes (0.0 only where oneDNN cannot run the op)."""
    for dtype in (torch.float32, torch.bfloat16):
        gain = prepack.packed_gain(dtype)
        assert gain == 0.0 or 0.05 < gain < 50, (dtype, gain)
