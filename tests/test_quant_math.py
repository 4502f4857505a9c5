"""The quantization math, called directly: GPTQ beats round-to-nearest on the same layer and data."""

from __future__ import annotations

import pytest
import torch

from compress.quant_math import gptq_quantize, hessian, output_error, rtn_quantize


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.05
    # activations live in a low-dimensional subspace plus noise, as real ones do
    inputs = torch.randn(1024, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(1024, 256)
    return weight, inputs


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_gptq_reconstruction_error_below_rtn(layer, group_size):
    weight, inputs = layer
    rtn = output_error(weight, rtn_quantize(weight, 4, group_size), inputs)
    gptq = output_error(weight, gptq_quantize(weight, hessian(inputs), 4, group_size), inputs)
    assert gptq < 0.5 * rtn


def test_rtn_uses_at_most_2_to_the_bits_levels_per_group(layer):
    weight, _ = layer
    q = rtn_quantize(weight, bits=4, group_size=64)
    for row in range(4):
        for start in range(0, 256, 64):
            assert len(torch.unique(q[row, start:start + 64])) <= 16


def test_more_bits_less_error(layer):
    weight, inputs = layer
    errors = [output_error(weight, rtn_quantize(weight, b, 64), inputs) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_gptq_on_identity_hessian_is_rtn_like(layer):
    weight, _ = layer
    h = torch.eye(weight.shape[1])
    assert torch.allclose(gptq_quantize(weight, h, 4, 64, damp=0.0), rtn_quantize(weight, 4, 64), atol=1e-6)
