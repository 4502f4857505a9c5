"""slimserve's own int4 decode kernel (server/engines/torch/int4_gemv.py): it reads torch's packed int4
weights in the layout this process packs them, gives torch's kernel's results (the same weights,
fp32 sums in another order), is picked by Int4Linear for few bf16 rows, and its AVX2 and plain-C
builds agree too."""

from __future__ import annotations

import platform

import pytest
import torch

from server.engines.torch import int4_gemv, native_build
from server.engines.torch.int4_linear import Int4Linear

# skipped only where it cannot run at all; with a compiler and a known layout, a failed build fails these
pytestmark = pytest.mark.skipif(native_build.compiler() is None or int4_gemv.packed_block() is None
                                or not int4_gemv.enabled,
                                reason="no C compiler, torch packs int4 in another layout, or SLIMSERVE_INT4_KERNEL=torch")


def _layer(in_f: int, out_f: int, group: int = 32, seed: int = 0) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
    return Int4Linear.from_linear(linear, group, torch.bfloat16)


def _close(own: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to bf16 rounding: at most one bf16 step apart (fp32 sums in another order), nearly always equal."""
    assert own.dtype == ref.dtype == torch.bfloat16 and own.shape == ref.shape
    assert ((own.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-3 * ref.float().abs().max()).all()
    assert (own == ref).float().mean() > 0.95


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape,group", [((576, 960), 32), ((1536, 576), 32), ((256, 128), 64), ((512, 64), 128)])
def test_equals_torchs_kernel(rows, shape, group):
    assert int4_gemv.off_reason() is None
    layer = _layer(*shape, group)
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    own = int4_gemv.gemv(x, layer.weight_int4, layer.scales_and_zeros, group)
    _close(own, torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight_int4, group, layer.scales_and_zeros))


def test_the_packing_probe_names_this_processs_layout():
    """The layout found by the probe reads back a random weight exactly (each nibble where the kernel looks)."""
    bn = int4_gemv.packed_block()
    q = torch.randint(0, 16, (2 * bn, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(2, 96, bn // 2)
    lo, hi = (packed & 15).int(), (packed >> 4).int()
    back = torch.cat([lo, hi], dim=2).transpose(1, 2).reshape(2 * bn, 96)
    assert torch.equal(back, q)


def test_int4_linear_uses_it_for_few_bf16_rows_and_torchs_kernel_otherwise(monkeypatch):
    layer = _layer(576, 960)
    calls = []
    real = int4_gemv.gemv
    monkeypatch.setattr(int4_gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        for rows in (1, int4_gemv.MAX_ROWS, int4_gemv.MAX_ROWS + 1):
            layer(torch.randn(rows, 576).to(torch.bfloat16))
        assert calls == [1, int4_gemv.MAX_ROWS]
        monkeypatch.setattr(int4_gemv, "enabled", False)
        layer(torch.randn(1, 576).to(torch.bfloat16))
    assert calls == [1, int4_gemv.MAX_ROWS]  # switched off: torch's kernel
    odd = _layer(576, 64 + int4_gemv.packed_block() // 2)  # not whole blocks of the packing: torch's kernel
    assert not odd.own_kernel


def test_bad_input_is_refused():
    layer = _layer(576, 960)
    with pytest.raises(ValueError, match="bf16"):
        int4_gemv.gemv(torch.randn(1, 576), layer.weight_int4, layer.scales_and_zeros, 32)
    with pytest.raises(ValueError, match="two"):
        int4_gemv.gemv(torch.randn(3, 576).to(torch.bfloat16), layer.weight_int4, layer.scales_and_zeros, 32)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 + FMA (the AVX2-only EPYC's path), plain C
def test_the_avx2_and_plain_c_builds_equal_torchs_kernel(monkeypatch, tmp_path, march):
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 targets")
    monkeypatch.setattr(native_build, "CACHE", tmp_path)
    monkeypatch.setattr(native_build, "FLAGS",
                        [f"-march={march}" if f == "-march=native" else f for f in native_build.FLAGS])
    int4_gemv._library.cache_clear()
    try:
        assert int4_gemv.off_reason() is None
        layer = _layer(576, 960)
        for rows in (1, 2):
            x = torch.randn(rows, 576).to(torch.bfloat16)
            own = int4_gemv.gemv(x, layer.weight_int4, layer.scales_and_zeros, 32)
            _close(own, torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight_int4, 32, layer.scales_and_zeros))
    finally:
        int4_gemv._library.cache_clear()
