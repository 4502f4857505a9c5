"""Load-time `--quantization int8 | int4` on CPUs: every nn.Linear of the decoder layers becomes an
Int8Linear or Int4Linear running torch's own packed kernels, and the output head an Int8Linear.

The output head is quantized too, always to int8: on a small model it is the largest matmul of a
decode step (SmolLM2-135M: 49152 x 576, a fifth of the linear weights), and 4 bits there cost
most of int4's quality (SmolLM2, 512 tokens of text: mean NLL bf16 3.174, int4 layers + int4 head
3.211, int4 layers + int8 head 3.177), as llama.cpp keeps its output tensor above 4 bits. A tied
head keeps the embedding in full precision for the lookup and gets its own quantized copy. A layer whose width the 4-bit
group size does not divide stays full precision (logged), as does an int8 layer with bf16 activations
whose input width is not a multiple of 16 (torch's kernel crashes on some: _int8_kernel_safe). The
q/k/v and gate/up layers of a block are joined first, one quantized matmul each (fused_projections.py),
as the full-precision engine does.

The kernels' activation dtype is chosen by measurement, once per process: each kernel is timed
on one decode-sized matmul in bf16 and in fp32, on one thread (a busy machine stalls a
two-thread call for a whole time slice), median of 7, and fp32 wins only when clearly faster
(on AVX-512 CPUs the bf16 path is vectorised and the fp32 one is not, ~10-100x apart).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from torch import nn

from server.engines.torch import int8_gemv
from server.engines.torch.fused_projections import fuse_projections
from server.engines.torch.int4_linear import GROUP_SIZES, Int4Linear
from server.engines.torch.int8_linear import Int8Linear
from server.engines.torch.packed_linear import swap_module, untie_head

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32


def _time_kernel(method: str, dtype: torch.dtype, out_f: int = 1536, in_f: int = 576, reps: int = 7) -> float:
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    layer = Int8Linear.from_linear(_linear(weight), dtype) if method == "int8" else \
        Int4Linear.from_linear(_linear(weight), DEFAULT_GROUP_SIZE, dtype)
    x = torch.randn(1, in_f, dtype=dtype)
    # torch's kernel: the dtype is chosen for it (int8_gemv's few-row kernel takes either dtype alike)
    run = (lambda: torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scales)) if method == "int8" \
        else (lambda: layer(x))
    times = []
    with torch.no_grad():
        for _ in range(3):
            run()
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight.data = weight
    if bias is not None:
        layer.bias.data = bias
    return layer


@functools.lru_cache(maxsize=None)
def kernel_dtype(method: str) -> torch.dtype:
    """The activation dtype in which this CPU runs the method's kernel faster (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {dtype: _time_kernel(method, dtype) for dtype in (torch.bfloat16, torch.float32)}
    finally:
        torch.set_num_threads(threads)
    best = torch.float32 if times[torch.float32] < 0.67 * times[torch.bfloat16] else torch.bfloat16
    log.info("%s kernel: %s", method, ", ".join(f"{str(d)[6:]} {t * 1e6:.0f} us" for d, t in times.items())
             + f" per 1536x576 row (1 thread); activations in {str(best)[6:]}")
    return best


def _int8_kernel_safe(in_features: int, dtype: torch.dtype) -> bool:
    """torch 2.13's `_weight_int8pack_mm` with bf16 activations segfaults on some input widths that are not a
    multiple of 16 (found on this CPU: in 8, 24, 50, 100, 130, 200 at out 7 or 3 rows); fp32 does not."""
    return dtype != torch.bfloat16 or in_features % 16 == 0


def precise_head(head: nn.Module | None) -> bool:
    """Whether an fp32 model's int8 head keeps fp32 logits: its matmul in fp32 on slimserve's own kernel, at
    every row count (torch's fp32 int8 kernel is scalar here: 38 ms at 4 rows of SmolLM2's head). In bf16 a
    logit near 20 is rounded to a step of 1/8, so near ties between the top two tokens flip: served beside
    its fp32 teacher, SmolLM2's int4 variant gave the teacher's exact answer on 39.3% of 300 router prompts
    with bf16 logits, 48.3% with fp32 logits (docs/routing.md). Costs nothing at 1-2 rows (the kernel converts
    bf16 to fp32 anyway), ~1.2x the bf16 head at 16 rows and ~1.6x at 2048 (prompt scoring). Where the kernel
    is off (SLIMSERVE_INT8_KERNEL=torch, no compiler), the head keeps the measured kernel dtype."""
    return head is not None and type(head) is nn.Linear and head.weight.dtype == torch.float32 \
        and int8_gemv.off_reason() is None


def quantize_linears(model: nn.Module, method: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                     compute_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Swap the model's nn.Linear layers in place; returns {"quantized": n (linears, a fused group's members
    each counted), "kept": m, "fused": groups, "kernel": what runs}."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
    compute_dtype = compute_dtype or kernel_dtype(method)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    precise = precise_head(head)
    head_dtype = torch.float32 if precise else compute_dtype if method == "int8" else kernel_dtype("int8")
    if method == "int8":
        build = lambda w, b: Int8Linear.from_linear(_linear(w, b), compute_dtype)  # noqa: E731
    else:
        build = lambda w, b: Int4Linear.from_linear(_linear(w, b), group_size, compute_dtype)  # noqa: E731
    def keeps_full_precision(module: nn.Linear) -> bool:  # a width the kernel cannot (safely) take
        if module is head or method == "int8":
            return not _int8_kernel_safe(module.in_features, head_dtype if module is head else compute_dtype)
        return module.in_features % group_size != 0

    before = sum(type(m) is nn.Linear for m in model.modules())
    groups = fuse_projections(model, build, accept=lambda m: not keeps_full_precision(m))
    quantized, kept = before - sum(type(m) is nn.Linear for m in model.modules()), []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if keeps_full_precision(module):
            kept.append(name)
            continue
        with torch.no_grad():
            if module is head or method == "int8":
                new = Int8Linear.from_linear(module, head_dtype, any_rows=precise) if module is head \
                    else Int8Linear.from_linear(module, compute_dtype)
            else:
                new = Int4Linear.from_linear(module, group_size, compute_dtype)
        swap_module(model, name, new)
        quantized += 1
    if head is not None and type(head) is nn.Linear:
        untie_head(model)
    if kept:
        shown = ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else "")
        log.warning("%s: %d linear layers stay full precision (input width not a multiple of %d): %s", method,
                    len(kept), group_size if method == "int4" else 16, shown)
    op = "_weight_int8pack_mm" if method == "int8" else \
        f"_weight_int4pack_mm_for_cpu, groups of {group_size} (the head: int8)"
    fused = f"; q/k/v and gate/up fused ({groups} groups)" if groups else ""
    own = ""
    if method == "int8" or head is not None:  # int4's head is int8 too
        off = int8_gemv.off_reason()
        own = f"; up to {int8_gemv.MAX_ROWS} rows slimserve's int8_gemv" if off is None else f"; int8_gemv off: {off}"
        own += "; the head in fp32 on slimserve's int8_gemv" if precise else ""
    return {"quantized": quantized, "kept": len(kept), "fused": groups,
            "kernel": f"aten.{op}, {str(compute_dtype).removeprefix('torch.')} activations{fused}{own}"}
