"""q/k/v and gate/up as one packed matmul each (fused_projections.py): every member returns what its own
nn.Linear returns, whatever the call order; a new input is recomputed, never served stale; the engine
fuses them when prepacking (its outputs equal the plain engine's: tests/test_prepack.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engines.torch import fused_projections, prepack
from server.engines.torch.engine import TorchEngine
from server.engines.torch.fused_projections import SharedProjection, fuse_projections
from server.engines.torch.onednn_linear import can_pack

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


class _Attention(nn.Module):
    def __init__(self, dtype, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(64, 16, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(64, 16, bias=bias, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(
    torch.bfloat16, 2e-2, marks=pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN cannot pack bf16 "
                                                   "weights on this CPU (AVX2 only); the engine keeps nn.Linear"))])
@pytest.mark.parametrize("bias", [False, True])
def test_members_equal_their_linears_in_any_order(dtype, tol, bias):
    torch.manual_seed(0)
    block = _Attention(dtype, bias)
    plain = {n: getattr(block, n) for n in ("q_proj", "k_proj", "v_proj")}
    assert fuse_projections(block) == 1
    assert all(isinstance(getattr(block, n), SharedProjection) for n in plain)
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj"), ("k_proj",)):
            for name in order:
                torch.testing.assert_close(getattr(block, name)(x), plain[name](x), rtol=tol, atol=tol)


def test_a_new_input_is_recomputed():
    torch.manual_seed(0)
    block = _Attention(torch.float32, bias=False)
    k_proj = block.k_proj
    fuse_projections(block)
    x, y = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        block.q_proj(x)  # the group now holds x's outputs
        torch.testing.assert_close(block.k_proj(y), k_proj(y))  # not x's
        torch.testing.assert_close(block.v_proj(y), block.v_proj(y))


def test_unlike_groups_stay_apart():
    block = _Attention(torch.float32, bias=False)
    block.v_proj = nn.Linear(64, 16, bias=True)  # bias on one member only
    assert fuse_projections(block) == 0
    assert isinstance(block.q_proj, nn.Linear)


def test_the_engine_fuses_when_it_prepacks(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(prepack, "packed_gain", lambda dtype: 2.0)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    layers = engine.model.config.num_hidden_layers
    shared = [m for m in engine.model.modules() if isinstance(m, SharedProjection)]
    assert len(shared) == 5 * layers  # q, k, v, gate, up in every block
    assert "fused (%d groups)" % (2 * layers) in engine.linear_kernel
    assert set(engine.base_shapes()) == set(TorchEngine.load("plain", tiny_model_dir, dtype="float32",
                                                             prepack_weights=False).base_shapes())
    monkeypatch.setattr(fused_projections, "GROUPS", ())
    unfused = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    assert engine.weight_bytes == unfused.weight_bytes
