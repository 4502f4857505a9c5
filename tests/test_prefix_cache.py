"""Prefix caching and chunked prefill in the PyTorch engine: greedy outputs equal to the plain engine's
(fp32 and bf16, batched rows, a LoRA adapter), cached prompt tokens not computed again, and a decoding
row that keeps producing tokens while a long prompt is prefilled in chunks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapter_factory import make_adapter
from adapters.loader import load_lora
from engine_run import greedy_tokens
from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.torch.chunking import plan_chunks
from server.engines.torch.engine import TorchEngine
from server.engines.torch.prefix_cache import PrefixCache

SYSTEM = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. " * 6
QUESTIONS = ["Hello, world!", "Numbers: 1 2 3", "How are you today?"]
ITEMS = [(SYSTEM + q, adapter) for q in QUESTIONS for adapter in (None, "a")]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("prefix-lora") / "a", seed=1, rank=8)


def _engine(folder, adapter_dir, dtype: str, **batching) -> TorchEngine:
    engine = TorchEngine.load("tiny", folder, dtype=dtype, **batching)
    asyncio.run(engine.start())
    asyncio.run(engine.install_adapter(load_lora("a", adapter_dir, engine.base_shapes(), max_rank=64)))
    return engine


def _outputs(engine) -> list[list[list[int]]]:
    """The items batched (twice: the second time their prefixes are cached), then one by one."""
    return [greedy_tokens(engine, ITEMS), greedy_tokens(engine, ITEMS), [greedy_tokens(engine, [i])[0] for i in ITEMS]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_and_chunked_outputs_equal_plain(tiny_model_dir, adapter_dir, dtype):
    configs = {"plain": dict(enable_prefix_caching=False),
               "cached": dict(),
               "chunked": dict(enable_prefix_caching=False, max_num_batched_tokens=16, max_prefill_tokens=16),
               "both": dict(max_num_batched_tokens=16, max_prefill_tokens=16)}
    results = {}
    for name, batching in configs.items():
        engine = _engine(tiny_model_dir, adapter_dir, dtype, **batching)
        try:
            results[name] = _outputs(engine)
            hits = engine.stats().prefix_cache_hits
        finally:
            asyncio.run(engine.shutdown())
        assert (hits > 0) == (batching.get("enable_prefix_caching", True)), name
    plain = results["plain"][0]
    assert plain[0] != plain[1], "the adapter should change the output"
    for name, runs in results.items():
        for run in runs:
            assert run == plain, name


def test_shared_prefix_is_not_computed_again(tiny_model_dir, adapter_dir):
    engine = _engine(tiny_model_dir, adapter_dir, "float32")
    try:
        prefix = len(engine.encode(SYSTEM))
        greedy_tokens(engine, [ITEMS[0]], max_tokens=2)
        assert engine.stats().prefix_cache_hits == 0
        greedy_tokens(engine, [ITEMS[2]], max_tokens=2)  # same system prompt, another question
        assert engine.stats().prefix_cache_hits >= prefix - 16  # whole 16-token blocks
        before = engine.stats().prefix_cache_hits
        greedy_tokens(engine, [ITEMS[3]], max_tokens=2)  # the same prompt with an adapter: other KV, no hit
        assert engine.stats().prefix_cache_hits == before
    finally:
        asyncio.run(engine.shutdown())


def test_a_decoding_row_gets_tokens_while_a_long_prompt_is_prefilled(tiny_model_dir, adapter_dir):
    engine = _engine(tiny_model_dir, adapter_dir, "float32", max_num_batched_tokens=16, enable_prefix_caching=False)
    events: list[str] = []

    async def one(name: str, prompt: str, max_tokens: int, started: asyncio.Event | None = None):
        req = GenerationRequest(name, engine.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                            ignore_eos=True), RequestStats("tiny"))
        async for chunk in engine.generate(req):
            events.extend(name for _ in chunk.token_ids)
            if started is not None:
                started.set()

    async def run():
        started = asyncio.Event()
        decoding = asyncio.create_task(one("decoding", "Hello", 120, started))
        await started.wait()
        events.append("long submitted")
        await one("long", SYSTEM * 2, 1)  # ~400 tokens: ~25 chunks of 16
        await decoding

    try:
        asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown())
    between = events[events.index("long submitted"):events.index("long")]
    assert between.count("decoding") >= 10, events


def test_plan_chunks_in_arrival_order_within_the_budget():
    assert plan_chunks([1000, 20], 256) == [256, 0]
    assert plan_chunks([20, 1000], 256) == [20, 236]
    assert plan_chunks([5, 7], 256) == [5, 7]


def test_prefix_cache_evicts_least_recently_used_leaves_first():
    kv = torch.randn(2, 2, 1, 64, 4)
    block_bytes = kv[:, :, :, :16].numel() * kv.element_size()
    cache = PrefixCache(max_bytes=4 * block_bytes, block=16)
    cache.insert(list(range(64)), None, kv)
    found, got = cache.lookup(list(range(64)) + [99], None)
    assert found == 64 and torch.equal(got, kv)
    assert cache.lookup(list(range(64)) + [99], 1)[0] == 0  # another adapter
    cache.insert(list(range(100, 132)), None, kv)  # two more blocks: the first prompt's last two go
    assert cache.lookup(list(range(64)) + [99], None)[0] == 32
    assert cache.bytes <= cache.max_bytes


def test_prefix_cache_counters_in_metrics():
    from server.engines.base import EngineStats
    from server.metrics import Metrics

    metrics = Metrics()
    metrics.render({"m": EngineStats(running=0, waiting=0, prefix_cache_queries=100, prefix_cache_hits=64)})
    text = metrics.render({"m": EngineStats(running=0, waiting=0, prefix_cache_queries=150, prefix_cache_hits=96)})
    assert b'slimserve_prefix_cache_queries_total{model="m"} 150.0' in text
    assert b'slimserve_prefix_cache_hits_total{model="m"} 96.0' in text
