"""The compiled decode step (compiled_decode.py, #19 item 2): the same greedy tokens as the eager engine in
fp32 (rows of different lengths joining and leaving, one row alone), bf16 logits as close to the fp32
model's as the eager step's, adapter rows decoded
eagerly, and eager with the reason where it cannot compile (a model it does not cover) or where its
graph fails (layers gone)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapter_factory import make_adapter
from adapters.loader import load_lora
from engine_run import FreeTokens, greedy_tokens, mean_kl
from server.engines.torch.compiled_decode import CompiledDecode
from server.engines.torch.engine import TorchEngine
from server.engines.torch.runner import ModelRunner

ITEMS = [(p, None) for p in ("Hello, world!", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "The quick brown fox", "a")]


def _run(engine: TorchEngine, items=ITEMS, max_tokens: int = 20) -> list[list[int]]:
    asyncio.run(engine.start())
    try:
        return greedy_tokens(engine, items, max_tokens=max_tokens) + [
            greedy_tokens(engine, items[-1:], max_tokens=max_tokens)[0]]  # one row alone: the single-row graph
    finally:
        asyncio.run(engine.shutdown())


def test_greedy_tokens_equal_the_eager_engine_fp32(tiny_model_dir):
    eager = _run(TorchEngine.load("tiny", tiny_model_dir, dtype="float32"))
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", compile_decode=True)
    compiled = _run(engine)
    assert engine.decode_step == "compiled"
    runner = engine._scheduler.runner
    assert runner.compiled.steps > 20 and runner.compiled.failures == 0
    assert compiled == eager


def _forced_logits(engine: TorchEngine, compiled: bool, steps: int = 12) -> torch.Tensor:
    """Logits of `steps` decode steps over three left-padded rows fed the same fixed tokens, in fp32."""
    runner = ModelRunner(engine.model, engine.device, 0)
    if compiled:
        runner.compiled = CompiledDecode(engine.model)
        runner.compiled.warm_up(ModelRunner(engine.model, engine.device, 0))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (20, 7, 13)]
    out = []
    with torch.inference_mode():
        runner.join(runner.prefill(prompts)[1])
        for step in range(steps):
            tokens = torch.randint(3, 300, (3,), generator=gen).tolist()
            out.append(runner.decode(tokens, [len(p) + step for p in prompts]).float())
    if compiled:
        assert runner.compiled.steps == steps and runner.compiled.failures == 0
        runner.compiled.close()
    return torch.stack(out)


def test_bf16_logits_are_as_precise_as_the_eager_step(tiny_model_dir):
    """bf16 is held to precision, as the grouped attention is (test_grouped_attention.py): the generated
    kernels sum in another order, and the random tiny model's near ties then pick other greedy tokens.
    Against the fp32 model, compiled bf16 logits are no further off than eager bf16's."""
    truth = _forced_logits(TorchEngine.load("tiny", tiny_model_dir, dtype="float32"), compiled=False)
    bf16 = TorchEngine.load("tiny", tiny_model_dir, dtype="bfloat16")
    eager, compiled = _forced_logits(bf16, compiled=False), _forced_logits(bf16, compiled=True)
    assert mean_kl(truth, compiled) <= 1.25 * mean_kl(truth, eager), (mean_kl(truth, compiled), mean_kl(truth, eager))
    assert (compiled - eager).abs().max() < 0.1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_load_time_int8_int4_compile_with_q_k_v_and_gate_up_as_one_call(tiny_model_dir, method, monkeypatch):
    """The quantized layers run their own kernels inside the graph (linear_op), a fused group as one call.
    Attention on the matmul path here, as the eager step's: the kernels compute in bf16, where the attention
    kernel's fp32 rounding differences (tests/test_decode_attention.py) would flip bf16 roundings."""
    from server.engines.torch import decode_attention
    from server.engines.torch.decode_graph import DecodeGraph

    monkeypatch.setattr(decode_attention, "enabled", False)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization=method)
    graph = DecodeGraph(engine.model)
    assert len(graph.slots) == 4 * engine.model.config.num_hidden_layers + 1  # qkv, o, gate_up, down; the head
    graph.release()
    eager, compiled = _forced_logits(engine, compiled=False), _forced_logits(engine, compiled=True)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_adapter_rows_decode_eagerly(tiny_model_dir, tmp_path):
    folder = make_adapter(tiny_model_dir, tmp_path / "a", seed=1, rank=4)
    items = [("Hello, world!", "a"), ("The quick brown fox", None)]

    def run(compile_decode: bool):
        engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", compile_decode=compile_decode)
        asyncio.run(engine.start())
        try:
            asyncio.run(engine.install_adapter(load_lora("a", folder, engine.base_shapes(), max_rank=64)))
            together = greedy_tokens(engine, items)
            return together + [greedy_tokens(engine, items[1:])[0]], engine._scheduler.runner.compiled
        finally:
            asyncio.run(engine.shutdown())

    eager, _ = run(False)
    compiled_out, compiled = run(True)
    assert compiled_out == eager
    assert 0 < compiled.steps < 12 + 12 and compiled.failures == 0  # only the base-model row's own steps


def test_a_model_it_does_not_cover_stays_eager_with_the_reason(tiny_model_dir):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", grouped_attention=False, compile_decode=True)
    _run(engine, ITEMS[:1], max_tokens=4)
    assert engine.decode_step.startswith("eager (needs the grouped decode attention")
    from server.routes.models import _dtype_fields

    assert _dtype_fields(engine)["decode_step"] == engine.decode_step


def test_a_failing_graph_falls_back_to_eager_steps(tiny_model_dir):
    """Its layers released under it (as after a close): each step fails, runs eagerly, and after three
    failures the engine stops trying; the output is unchanged."""
    eager = _run(TorchEngine.load("tiny", tiny_model_dir, dtype="float32"), ITEMS[:2], max_tokens=8)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", compile_decode=True)
    asyncio.run(engine.start())
    try:
        compiled = engine._scheduler.runner.compiled
        compiled.close()
        out = greedy_tokens(engine, ITEMS[:2], max_tokens=8) + [greedy_tokens(engine, ITEMS[1:2], max_tokens=8)[0]]
    finally:
        asyncio.run(engine.shutdown())
    assert out == eager
    assert compiled.failures == 3 and not compiled.usable and "released" in compiled.last_error


def test_draft_checks_compiled_keep_the_eager_engines_tokens(tmp_path):
    """Prompt lookup on a compiled engine: its draft checks (several positions a row) run through the
    compiled graph too, and every row's output is the plain eager engine's (fp32; rows of one and many)."""
    from test_prompt_lookup import LOOKUP, ROWS, _model, _run as run_rows

    path = _model(tmp_path / "model", 0.0)  # a bigram model: drafts get accepted
    plain = TorchEngine.load("tiny", path, dtype="float32")
    engine = TorchEngine.load("tiny", path, dtype="float32", lookup=LOOKUP, compile_decode=True)
    engine._scheduler.step_cost = FreeTokens()  # check every draft
    for e in (plain, engine):
        asyncio.run(e.start())
    try:
        want = run_rows(plain, ROWS) + run_rows(plain, ROWS[:1])
        got = run_rows(engine, ROWS) + run_rows(engine, ROWS[:1])
    finally:
        for e in (plain, engine):
            asyncio.run(e.shutdown())
    compiled = engine._scheduler.runner.compiled
    assert engine.decode_step == "compiled" and compiled.drafts
    assert compiled.failures == 0, compiled.last_error
    spec = engine._scheduler.spec
    assert spec.drafts > 5 and spec.accepted > 10 and compiled.draft_steps > 3  # through the graph
    assert got == want


@pytest.mark.parametrize("attention", ["kernel", "matmuls"])
def test_compiled_draft_checks_equal_the_eager_checks(tiny_model_dir, attention):
    """The w-position graph against the eager draft check on the random tiny model (fp32): rows of unequal
    drafts (right-padded for eager, packed for the graph), each settle keeping a different number of columns per row, then more checks
    and a plain step over the caches both paths left: logits at every fed position agree."""
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    compiled = CompiledDecode(engine.model, drafts=True)
    compiled.graph.own_attention = compiled.graph.own_attention and attention == "kernel"
    compiled.warm_up(ModelRunner(engine.model, engine.device, 0))
    gen = torch.Generator().manual_seed(3)
    for n_rows in (1, 3):
        prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (20, 7, 13)[:n_rows]]
        runners = [ModelRunner(engine.model, engine.device, 0) for _ in range(2)]
        with torch.inference_mode():
            for runner in runners:
                runner.compiled = compiled
                runner.join(runner.prefill(prompts)[1])
            positions = [len(p) for p in prompts]
            for step, width in enumerate((2, 5, 3, 4)):
                # the longest row last: a short row before a long one in the packed order
                fed = [torch.randint(3, 300, (max(1, width - (i + 1) % n_rows),), generator=gen).tolist()
                       for i in range(n_rows)]
                kept = [1 + (step + i) % len(f) for i, f in enumerate(fed)]
                (eager, e_at), (graph, g_at) = (r.verify(fed, positions, compiled=use)
                                                for r, use in zip(runners, (False, True)))
                assert graph.shape[0] == sum(map(len, fed)) < eager.shape[0] or n_rows == 1  # packed: fed tokens only
                for i, f in enumerate(fed):
                    torch.testing.assert_close(graph[g_at[i, :len(f)]], eager[e_at[i, :len(f)]], rtol=1e-4, atol=1e-4)
                for runner in runners:
                    runner.settle(kept, max(map(len, fed)))
                positions = [p + k for p, k in zip(positions, kept)]
            last = torch.randint(3, 300, (n_rows,), generator=gen).tolist()
            eager, graph = (r.decode(last, positions, compiled=use) for r, use in zip(runners, (False, True)))
            torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    assert compiled.draft_steps == 8 and compiled.draft_failures == 0 and compiled.failures == 0, compiled.last_error
    compiled.close()



ISA_RUN = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from engine_run import greedy_tokens
from server.engines.torch.engine import TorchEngine
engine = TorchEngine.load("tiny", sys.argv[1], dtype="float32", compile_decode=True)
asyncio.run(engine.start())
items = [(p, None) for p in sys.argv[3:]]
print(engine.decode_step, greedy_tokens(engine, items, max_tokens=20), sep="|")
asyncio.run(engine.shutdown())
"""


def test_kernels_cached_for_one_vector_isa_are_not_reused_for_another(tiny_model_dir):
    """This process compiles the tiny model's step into the cache; a process told to run ATen's AVX2
    kernels, given the same cache folder, compiles its own (a folder per ISA, use_isa_cache_dir) and
    decodes as the eager engine does. With one folder it reused the AVX-512 kernels' source under
    8-lane vectors and aborted on a corrupted heap."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from server.engines.torch.compiled_decode import use_isa_cache_dir

    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", compile_decode=True)
    eager = _run(TorchEngine.load("tiny", tiny_model_dir, dtype="float32"), ITEMS, max_tokens=20)[:len(ITEMS)]
    assert _run(engine, ITEMS, max_tokens=20)[:len(ITEMS)] == eager  # compiled here: the cache holds its kernels
    folder = use_isa_cache_dir()
    base = os.path.dirname(folder) if os.path.basename(folder).startswith("isa-") else folder
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": base}
    out = subprocess.run([sys.executable, "-c", ISA_RUN, str(tiny_model_dir), str(Path(__file__).parent),
                          *[p for p, _ in ITEMS]], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    decode_step, tokens = out.stdout.strip().splitlines()[-1].split("|")
    assert decode_step == "compiled"
    assert tokens == str(eager)
