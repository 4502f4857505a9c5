"""slimserve's own decode attention kernel (server/engines/torch/decode_attention.py): the same numbers as
the compiled step's matmul path (DecodeGraph._attention) to fp32 rounding, for decode steps and draft
checks, over left-padded masks and cache views; its AVX2 and plain-C builds too; and the compiled step
picks it where it runs. The compiled step's greedy tokens with it: tests/test_compiled_decode.py."""

from __future__ import annotations

import pytest
import torch

from kernel_builds import MARCHES, built_for
from server.engines.torch import decode_attention, native_build
from server.engines.torch.attention import allowed_columns
from server.engines.torch.decode_graph import DecodeGraph

# skipped only where it cannot be built at all; with a compiler, a build that fails fails these tests
pytestmark = pytest.mark.skipif(native_build.compiler() is None or not decode_attention.enabled,
                                reason="no C compiler, or SLIMSERVE_ATTENTION_KERNEL=torch")

# rows, heads, kv heads, new positions (w), length, head dim
SHAPES = [(1, 9, 3, 1, 50, 64),  # SmolLM2's heads, one decode row
          (16, 9, 3, 1, 190, 64),  # sixteen rows
          (3, 9, 3, 4, 33, 64),  # a draft check of 4 positions
          (2, 8, 2, 1, 7, 40),  # a head dim that is not a multiple of the vectors
          (2, 6, 1, 3, 20, 64)]  # six query heads a group (queries go four at a time)


def _case(rows, heads, kv_heads, w, length, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, w, dim, generator=gen).to(dtype)
    keys = torch.randn(rows, kv_heads, length + 9, dim, generator=gen).to(dtype)  # a buffer with spare capacity
    values = torch.randn(rows, kv_heads, length + 9, dim, generator=gen).to(dtype)
    mask = torch.rand(rows, length, generator=gen) > 0.3  # holes, as rejected drafts and left padding leave
    mask[:, -w:] = True
    return q, keys[:, :, :length], values[:, :, :length], mask


def _matmul_path(q, k, v, mask, scale):
    return DecodeGraph._attention(q, k, v, allowed_columns(mask, q.shape[2]), scale)


@pytest.mark.parametrize("parts", ["by threads", "one task a kv head", "one task a query head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_matmul_path(shape, dtype, parts):
    assert decode_attention.off_reason() is None
    q, k, v, mask = _case(*shape, dtype)
    split = {"by threads": None, "one task a kv head": 1, "one task a query head": shape[1] // shape[2]}[parts]
    got = decode_attention.attend(q, k, v, mask, 0.125, parts=split)
    want = _matmul_path(q, k, v, mask, 0.125)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    else:  # fp32 inside, then rounded to bf16: at most one bf16 step apart, and nearly always equal
        assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-6).all()
        assert (got == want).float().mean() > 0.99


def test_a_row_with_nothing_to_attend_to_stays_finite_as_the_matmul_path():
    q, k, v, mask = _case(2, 9, 3, 1, 12, 64, torch.float32)
    mask[0] = False
    got, want = decode_attention.op(q, k, v, mask, 0.125), _matmul_path(q, k, v, mask, 0.125)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_draft_checks_padding_is_skipped_and_the_fed_positions_are_unchanged(dtype, parts):
    """skip_padding: row 0 fed 4 positions, row 1 two and row 2 one (their last new columns masked, as
    runner.verify leaves a shorter row): fed positions equal the call without skipping, padding is zeros;
    the compiled graph's op does the same."""
    q, k, v, mask = _case(3, 9, 3, 4, 33, 64, dtype)
    mask[1, -2:] = False
    mask[2, -3:] = False
    full = decode_attention.attend(q, k, v, mask, 0.125, parts=parts)
    got = decode_attention.attend(q, k, v, mask, 0.125, skip_padding=True, parts=parts)
    fed = mask[:, -4:]
    assert torch.equal(got[fed], full[fed]) and fed.sum() == 7
    assert (got[~fed] == 0).all() and (full[~fed] != 0).any()
    graph_op = decode_attention.op(q, k, v, mask, 0.125, True)
    assert torch.equal(graph_op, decode_attention.attend(q, k, v, mask, 0.125, True))


def test_bad_input_is_refused_with_the_reason():
    q, k, v, mask = _case(2, 9, 3, 1, 12, 64, torch.float32)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        decode_attention.attend(q.bfloat16(), k, v, mask, 0.125)
    with pytest.raises(ValueError, match="shapes"):
        decode_attention.attend(q, k, v, mask[:, 1:], 0.125)
    with pytest.raises(ValueError, match="shapes"):  # values of another head size (as MLA models have)
        decode_attention.attend(q, k, v[..., :32], mask, 0.125)
    with pytest.raises(ValueError, match="parts"):
        decode_attention.attend(q, k, v, mask, 0.125, parts=2)


@pytest.mark.parametrize("march", MARCHES)
def test_the_avx2_and_plain_c_builds_equal_the_matmul_path(monkeypatch, tmp_path, march):
    with built_for(march, decode_attention, monkeypatch, tmp_path):
        assert decode_attention.off_reason() is None
        for shape in SHAPES[2:]:
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v, mask = _case(*shape, dtype)
                got, want = decode_attention.attend(q, k, v, mask, 0.125), _matmul_path(q, k, v, mask, 0.125)
                assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-5).all()


def test_the_compiled_step_uses_it_unless_switched_off(tiny_model_dir, monkeypatch):
    from server.engines.torch.engine import TorchEngine

    model = TorchEngine.load("tiny", tiny_model_dir, dtype="float32").model
    graph = DecodeGraph(model)
    assert graph.own_attention
    graph.release()
    monkeypatch.setattr(decode_attention, "enabled", False)
    graph = DecodeGraph(model)
    assert not graph.own_attention and decode_attention.off_reason() == "SLIMSERVE_ATTENTION_KERNEL=torch"
    graph.release()
