"""slimserve's own int8 decode kernel (server/engines/torch/int8_gemv.py): built for this CPU, it
multiplies by the same weight as torch's kernel (int8 values times the stored scales) for every row
count up to 3 (MAX_ROWS is 2), both activation dtypes, widths that are not a multiple of its 4-row blocks and
a bias; Int8Linear uses it for few rows and torch's kernel above; the build is cached per CPU."""

from __future__ import annotations

import pytest
import torch

from kernel_builds import MARCHES, built_for
from server.engines.torch import int8_gemv, native_build
from server.engines.torch.int8_linear import Int8Linear

# skipped only where it cannot be built at all; with a compiler, a build that fails fails these tests
pytestmark = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler")


def _linear(in_f: int, out_f: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_f, out_f, bias=bias)
    layer.weight.data.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, int8_gemv.MAX_ROWS])
@pytest.mark.parametrize("shape", [(576, 960), (100, 7), (1536, 577)])  # (in, out): out not a multiple of 4
def test_equals_the_dequantized_matmul(dtype, rows, shape):
    assert int8_gemv.available(), int8_gemv.why_not()
    layer = Int8Linear.from_linear(_linear(*shape, bias=False), dtype)
    x = torch.randn(rows, shape[0]).to(dtype)
    ref = x.float() @ layer.dequantized().t()
    own = int8_gemv.gemv(x.contiguous(), layer.weight_int8, layer.scales_fp32, None)
    assert own.dtype == dtype and own.shape == (rows, shape[1])
    err = (own.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale, err
    else:  # the output rounded once to bf16: half a unit in its last place
        assert torch.all((own.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * scale)
    if shape[0] % 16:
        return  # torch's bf16 kernel segfaults on some in_features not a multiple of 16 (quantize_linears guards)
    torch_kernel = torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.weight_int8, layer.scales)
    bound = (1e-5 if dtype == torch.float32 else 2 ** -7) * scale
    assert (own.float() - torch_kernel.float()).abs().max().item() <= bound


def test_bias_is_added_once():
    layer = Int8Linear.from_linear(_linear(64, 10, bias=True), torch.float32)
    x = torch.randn(2, 64)
    bias = torch.linspace(-1, 1, 10)
    own = int8_gemv.gemv(x, layer.weight_int8, layer.scales_fp32, bias)
    assert torch.allclose(own, x @ layer.dequantized().t() + bias, atol=1e-5)


def test_int8_linear_uses_it_for_few_rows_and_torchs_kernel_above(monkeypatch):
    layer = Int8Linear.from_linear(_linear(128, 64, bias=True), torch.bfloat16)
    calls = []
    real = int8_gemv.gemv
    monkeypatch.setattr(int8_gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    few, many = torch.randn(int8_gemv.MAX_ROWS, 128), torch.randn(int8_gemv.MAX_ROWS + 1, 128)
    with torch.no_grad():
        y_few, y_many = layer(few), layer(many)
        ref = lambda x: x.to(torch.bfloat16).float() @ layer.dequantized().t() + layer.bias.float()  # noqa: E731
    assert calls == [int8_gemv.MAX_ROWS]
    assert y_few.dtype == few.dtype and y_many.dtype == many.dtype
    for y, x in ((y_few, few), (y_many, many)):
        assert (y - ref(x)).abs().max() <= 2 ** -6 * ref(x).abs().max()
    monkeypatch.setattr(int8_gemv, "enabled", False)
    layer(few)
    assert calls == [int8_gemv.MAX_ROWS]  # switched off: torch's kernel


def test_one_build_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "CACHE", tmp_path)
    build = lambda: native_build.build("int8_gemv", int8_gemv.SOURCE)  # noqa: E731
    first = build()
    built = first.stat().st_mtime_ns
    assert build() == first and first.parent == tmp_path
    assert first.stat().st_mtime_ns == built  # cached: not rebuilt
    monkeypatch.setattr(native_build, "cpu_flags", lambda: "flags : fpu sse sse2 avx avx2")
    other = build()
    assert other != first and sorted(p.name for p in tmp_path.glob("*.so")) == sorted([first.name, other.name])


def test_no_compiler_leaves_torchs_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "CACHE", tmp_path)
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    int8_gemv._library.cache_clear()
    try:
        assert not int8_gemv.available() and "no C compiler" in int8_gemv.why_not()
        layer = Int8Linear.from_linear(_linear(32, 8, bias=False), torch.float32)
        assert layer.scales_fp32 is None
        x = torch.randn(1, 32)
        assert torch.allclose(layer(x), x @ layer.dequantized().t(), atol=1e-5)
    finally:
        int8_gemv._library.cache_clear()


@pytest.mark.parametrize("march", MARCHES)
def test_the_avx2_and_plain_c_paths_equal_the_dequantized_matmul(monkeypatch, tmp_path, march):
    with built_for(march, int8_gemv, monkeypatch, tmp_path):
        assert int8_gemv.available(), int8_gemv.why_not()
        for in_f in (1536, 100):  # 100: the vector loop's remainder too
            layer = Int8Linear.from_linear(_linear(in_f, 577, bias=False), torch.float32)
            x = torch.randn(2, in_f)
            own = int8_gemv.gemv(x, layer.weight_int8, layer.scales_fp32, None)
            ref = x @ layer.dequantized().t()
            assert (own - ref).abs().max() <= 1e-5 * ref.abs().max()
