"""The decode step through torch.compile (inductor, CPU), compiled before the engine serves (#19 item 2).

A prepacked bf16 step of SmolLM2 spent ~half its time outside the linears: ~200 small ops and ~500
Python module calls a step. Compiled, the ops between two linears become one generated C++ loop and
the module tree disappears; the linears stay the layers' own kernels (linear_op.py). Only the
batch's sizes are dynamic (rows, length, buffer capacity, a draft check's width): one graph for a single
row, one for several, and with prompt lookup on the same two for its draft checks; `warm_up` compiles
them on scratch rows at start (~1-2 min on 2 cores), so no request waits for a compile. After that a step that would need another graph runs eagerly instead (the stance
"fail_on_recompile"), and after `_MAX_FAILURES` failed steps the engine stays eager.

Outputs: bf16 intermediates are rounded as eager rounds them (`emulate_precision_casts`; without it
inductor keeps them in fp32 and greedy tokens drift from eager's). fp32: the same greedy tokens as the
eager step (tests/test_compiled_decode.py). bf16: reductions (norms, softmax) still sum in another
order, so a near tie can flip a token, as with the grouped attention: on the random tiny model the
test holds it to precision (KL to the fp32 model no worse than eager bf16's); on SmolLM2 a probe gave
eager's tokens for 4 rows x 48 steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

from server.engines.torch.decode_graph import DecodeGraph, unsupported

log = logging.getLogger(__name__)

_MAX_FAILURES = 3
# round bf16 intermediates as eager does (cpp.threads 1, generated kernels without an OpenMP team, was
# measured served: c=1 31.9 vs eager 39.2 tok/s, c=16 319 vs 327; not kept)
_INDUCTOR = {"emulate_precision_casts": True}
_WARM_ROWS = (1, 2)  # a graph for one row, one for any number above
_WARM_WIDTHS = (1, 2)  # a decode step; a draft check of 2 or more positions (prompt lookup)


def why_not(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why the decode step of this model on this device is not compiled, or None."""
    if device.type != "cpu":
        return "compiled decode is built for CPUs (no CUDA graphs yet)"
    return unsupported(model)


class CompiledDecode:
    def __init__(self, model: torch.nn.Module, drafts: bool = False):
        """`drafts`: also compile the graphs of prompt lookup's draft check (several positions a row)."""
        self.graph = DecodeGraph(model)
        self.drafts = drafts
        self._step = torch.compile(self.graph,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.steps = 0  # steps it ran, draft checks included (tests and the log read them)
        self.draft_steps = 0
        self.failures = 0  # failed decode steps
        self.draft_failures = 0  # failed draft checks: they turn off only the compiled draft checks
        self.last_error = ""

    @property
    def usable(self) -> bool:
        return self.failures < _MAX_FAILURES

    @property
    def drafts_usable(self) -> bool:
        return self.drafts and self.draft_failures < _MAX_FAILURES and self.usable

    def warm_up(self, runner) -> float:
        """Compile every graph on scratch rows of `runner` (a ModelRunner of its own). Returns seconds."""
        started = time.perf_counter()
        use_isa_cache_dir()
        with torch.inference_mode():  # the engine decodes in inference mode: its tensors' dispatch keys are guarded
            self._warm(runner)
        return time.perf_counter() - started

    def _warm(self, runner) -> None:
        self._warm_width(runner, 1)
        if self.drafts:
            try:
                self._warm_width(runner, _WARM_WIDTHS[1])
            except Exception as exc:  # the decode graphs stand; draft checks stay eager
                self.drafts = False
                runner.clear()
                log.warning("draft checks stay eager, their graph did not compile: %s: %s", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")

    def _warm_width(self, runner, width: int) -> None:
        for rows in _WARM_ROWS:
            log.info("compiling the %s for %s row(s)", "decode step" if width == 1 else "draft check",
                     rows if rows == 1 else f"{rows}+")
            runner.join(runner.prefill([[runner.pad_id] * 4] * rows)[1])
            for step in range(2):  # a second step: the length moves (and the width: dynamic, no new graph)
                w = width + step if width > 1 else 1
                live = None if w == 1 else torch.tensor([r * w + j for r in range(rows) for j in range(w - r % 2)])
                self._call(runner, [[runner.pad_id] * w] * rows, [[4 + step * 3 + j for j in range(w)]] * rows,
                           strict=False, live=live)
            runner.clear()

    def step(self, runner, ids: torch.Tensor, positions: torch.Tensor,
             live: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [rows, width, vocab] of one step over runner's cache and mask (the new columns already
        in the mask; width 1: a decode step, more: a draft check, only when compiled with `drafts`), or
        None when the compiled step cannot run it (the caller runs it eagerly). A draft check passes
        `live`, the flat indices of the tokens fed (DecodeGraph), and gets their logits [len(live), vocab]."""
        draft = ids.shape[1] > 1
        try:
            logits = self._call(runner, ids, positions, strict=True, live=live)
            self.steps += 1
            self.draft_steps += draft
            return logits
        except Exception as exc:  # a guard that needs a new graph, or a failing graph: eager this step
            if draft:
                self.draft_failures += 1
            else:
                self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("compiled %s failed (%d of %d before staying eager): %s", "draft check" if draft else
                        "decode step", self.draft_failures if draft else self.failures, _MAX_FAILURES,
                        self.last_error.splitlines()[0])
            return None

    def _call(self, runner, ids, positions, strict: bool, live: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(ids):  # warm-up: token lists, and the mask grows here as the runner grows it
            ids, positions = torch.tensor(ids), torch.tensor(positions)
            runner.mask = torch.cat([runner.mask, runner.mask.new_ones(ids.shape)], dim=1)
        cache = runner.cache
        width = ids.shape[1]
        keys, values, column = cache.step_buffers(width)
        args = (ids, positions, runner.mask.bool(), keys, values, torch.arange(column, column + width), live)
        if strict:  # inference mode always: a grad-mode guard must not split the warm-up's graphs from the steps'
            with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
                logits = self._step(*args)
        else:
            _mark_dynamic(*args)
            with torch._inductor.config.patch(_INDUCTOR), torch.inference_mode():
                logits = self._step(*args)
        cache.advance(width)
        return logits

    def close(self) -> None:
        self.graph.release()


def use_isa_cache_dir() -> str:
    """Point inductor's cache at a folder of its own for the vector ISA this process compiles for, and
    return it. inductor's graph cache does not key its C++ kernels' source on that ISA: source written
    for AVX-512 (16 lanes a loop step), reused in a process compiling for AVX2 (ATEN_CPU_CAPABILITY=avx2,
    8-lane vectors), overflowed a kernel's scratch buffer ("free(): invalid pointer" under glibc's
    malloc check). Machines of different CPUs sharing one cache folder (a volume) would meet the same."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    isa = pick_vec_isa()
    described = f"{isa} {' '.join(isa.build_arch_flags().split()) if isa else ''}"
    key = "isa-" + (str(isa).split()[0] if isa else "none") + "-" + hashlib.sha1(described.encode()).hexdigest()[:8]
    folder = cache_dir()
    if os.path.basename(folder) != key:
        folder = os.path.join(folder, key)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def _mark_dynamic(ids, positions, mask, keys, values, column, live) -> None:
    """Only the batch's sizes vary: rows (above one), the mask's length and the buffers' capacity. Every
    model dimension stays a constant (all-dynamic shapes took over 6 minutes of symbolic simplification
    on SmolLM2's 30 layers, and generate slower code)."""
    rows = ids.shape[0] > 1
    for t in (ids, positions, mask, *keys, *values):
        if rows:
            torch._dynamo.mark_dynamic(t, 0)
    if ids.shape[1] > 1:  # a draft check: its width varies too
        for t in (ids, positions, column):
            torch._dynamo.mark_dynamic(t, t.dim() - 1)
    if live is not None:  # the tokens a draft check really feeds
        torch._dynamo.mark_dynamic(live, 0)
    torch._dynamo.mark_dynamic(mask, 1)
    for t in (*keys, *values):
        torch._dynamo.mark_dynamic(t, 2)
