"""`prepack_linears`: swap a CPU model's full-precision nn.Linear layers for OneDNNLinear where that
is measured to be faster on this machine (once per process and dtype); q/k/v and gate/up become one
packed matmul each (fused_projections.py).

Why measure: oneDNN's packed path follows its own ISA detection and the gain depends on the CPU
(AVX-512 bf16, AMX, AVX2 only: there oneDNN refuses bf16 packing outright) and on the dtype. Timing
two decode-sized matmuls (an MLP's 1536 x 576, an 8192 x 576 slice shaped like an output head) on
one thread, taking turns, costs under a second per dtype and keeps a slower path from being switched
on. The output head of a tied model gets its own packed copy (the embedding keeps the lookup
weight): on SmolLM2 that copy is 54 MiB in bf16, and the head is the largest matmul of a decode step
(2.6x faster packed, measured).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from torch import nn

from server.engines.torch.fused_projections import fuse_projections
from server.engines.torch.onednn_linear import OneDNNLinear, plain_weight
from server.engines.torch.packed_linear import swap_module, untie_head

log = logging.getLogger(__name__)

_PROBE_SHAPES = ((1536, 576), (8192, 576))
_MIN_GAIN = 1.1  # packed must be this much faster: below it, noise could pick either way
KERNEL = "oneDNN prepacked (mkldnn._linear_pointwise)"


def _best_times(a, b, reps: int = 21) -> tuple[float, float]:
    """Fastest of `reps` calls of each, the two taking turns: on a shared machine the minimum is the
    speed when the CPU was ours, and alternating keeps a burst of load from favouring either."""
    for _ in range(3):
        a(), b()
    best_a = best_b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
    return best_a, best_b


@functools.lru_cache(maxsize=None)
def packed_gain(dtype: torch.dtype) -> float:
    """Eager time / packed time, summed over the probe shapes, at one row (0.0: oneDNN cannot run it)."""
    if not torch.backends.mkldnn.is_available():
        return 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy machine stalls a two-thread call for a whole time slice
    try:
        gen = torch.Generator().manual_seed(0)
        eager = packed = 0.0
        with torch.no_grad():
            for out_f, in_f in _PROBE_SHAPES:
                linear = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
                linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
                fast = OneDNNLinear.from_linear(linear)
                x = torch.randn(1, in_f, generator=gen).to(dtype)
                if not torch.allclose(fast(x).float(), linear(x).float(), rtol=1e-2, atol=1e-3):
                    log.warning("oneDNN prepacked %s linear disagrees with nn.Linear; not used", dtype)
                    return 0.0
                e, p = _best_times(lambda: linear(x), lambda: fast(x))
                eager, packed = eager + e, packed + p
    except RuntimeError as exc:  # op missing or ISA unsupported in this build
        log.info("oneDNN prepacked %s linear unavailable: %s", dtype, exc)
        return 0.0
    finally:
        torch.set_num_threads(threads)
    return eager / packed


def prepack_linears(model: nn.Module) -> str | None:
    """Swap in place when it pays; returns what runs the linears (for /v1/models), None when unchanged."""
    layers = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and plain_weight(m)]
    if not layers:
        return None
    dtype = layers[0][1].weight.dtype
    gain = packed_gain(dtype)
    name = str(dtype).removeprefix("torch.")
    if gain < _MIN_GAIN:
        log.info("%s linears stay on nn.Linear: prepacked is %.2fx here (needs %.1fx)", name, gain, _MIN_GAIN)
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups = fuse_projections(model)  # q/k/v and gate/up: one packed matmul each (fused_projections.py)
    rest = [(full, m) for full, m in model.named_modules() if type(m) is nn.Linear and plain_weight(m)]
    with torch.no_grad():
        for full, module in rest:
            swap_module(model, full, OneDNNLinear.from_linear(module))
    if any(m is head for _, m in rest):
        untie_head(model)
    log.info("%d %s linear layers prepacked for oneDNN, %d groups of them fused (%.2fx per decode matmul, "
             "measured)", len(layers), name, groups, gain)
    fused = f"; q/k/v and gate/up fused ({groups} groups)" if groups else ""
    return f"{KERNEL}, {name}, {gain:.2f}x nn.Linear at load{fused}"
