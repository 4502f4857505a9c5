"""Self-speculation (speculative_config method quantized_self): the model's own int4/int8 copy drafts,
the model checks. Output equals the engine without it (fp32, greedy rows batched with sampled ones, stop
strings, max_tokens, penalties, logprobs), eager and compiled; the cache is left as it was after
drafting; the draft length follows measured costs; configurations it cannot run are refused at start."""

from __future__ import annotations

import asyncio

import pytest

from engine_run import FreeTokens
from server.engines.speculation_config import QuantizedSelfConfig, speculative_unsupported, torch_speculation
from server.engines.torch.engine import TorchEngine
from server.engines.torch.self_draft import SelfDraft, best_draft_length
from server.errors import ConfigError
from test_prompt_lookup import ROWS, _run


def _always_draft(engine: TorchEngine) -> SelfDraft:
    """Draft the most tokens whenever a row can take a draft (these tests are about exactness, and the
    tiny model's timings would decide otherwise now and then)."""
    self_draft = engine._scheduler.self_draft
    self_draft.choose = lambda chances, ratio, overhead: self_draft.max_tokens if any(
        c is not None for c in chances) else 0
    engine._scheduler.step_cost = FreeTokens()
    return self_draft


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_batched_greedy_output_is_unchanged(tiny_model_dir, plain, quantization):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32",
                              self_draft=QuantizedSelfConfig(quantization, 4))
    self_draft = _always_draft(engine)
    asyncio.run(engine.start())
    try:
        want = _run(plain, ROWS)
        assert _run(engine, ROWS) == want
        for row in ROWS[:3]:  # alone too
            assert _run(engine, [row]) == _run(plain, [row])
        stats = engine.stats()
        assert self_draft.draft_steps > 0 and stats.spec_draft_tokens > 0  # the draft path really ran
        assert 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens
        assert engine._scheduler.runner.cache is None  # every row left; nothing the draft wrote is held
    finally:
        asyncio.run(engine.shutdown())


def test_compiled_draft_and_check_give_the_same_output(tiny_model_dir, plain):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", compile_decode=True,
                              self_draft=QuantizedSelfConfig("int4", 3))
    self_draft = _always_draft(engine)
    asyncio.run(engine.start())
    try:
        assert engine.decode_step == "compiled"
        assert self_draft.compiled is not None and self_draft.compiled.usable
        assert _run(engine, ROWS) == _run(plain, ROWS)
        assert self_draft.compiled.steps > 0 and engine._scheduler.runner.compiled.draft_steps > 0
        assert self_draft.compiled.failures == 0 and engine._scheduler.runner.compiled.draft_failures == 0
    finally:
        asyncio.run(engine.shutdown())


def test_look_ahead_drafts_the_greedy_continuation_and_leaves_the_cache_as_it_was(tiny_model_dir):
    """With the model itself as the drafter, look_ahead's tokens are the model's greedy continuation (the
    positions, mask and cache columns of each step are right); after it, cache and mask are as before."""
    import torch

    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    runner = engine._scheduler.runner
    drafter = SelfDraft(engine.model, QuantizedSelfConfig("int4", 4))
    prompts = [engine.encode("The quick brown fox"), engine.encode("Numbers: 0 1 2 3 4 5")]
    with torch.inference_mode():
        logits, rows = runner.prefill(prompts)
        runner.join(rows)
        first = logits[:, -1].argmax(-1).tolist()
        length, mask = runner.cache.length, runner.mask.clone()
        keys = runner.cache.layers[0].keys.clone()
        tokens = runner.look_ahead(drafter, first, [len(p) for p in prompts], 4)
        assert runner.cache.length == length and torch.equal(runner.mask, mask)
        assert torch.equal(runner.cache.layers[0].keys, keys)
        for prompt, t0, drafted in zip(prompts, first, tokens):
            full = torch.tensor([prompt + [t0] + drafted[:3]])
            assert engine.model(full).logits[0, -4:].argmax(-1).tolist() == drafted


def test_draft_length_follows_costs_and_acceptance():
    sure = [0.98]
    assert best_draft_length(sure, 6, share=0.1, ratio=0.0, overhead=0.0) >= 5  # cheap and accepted: long
    assert best_draft_length(sure, 6, share=1.0, ratio=0.0, overhead=0.0) == 0  # as dear as the model: never
    assert best_draft_length([0.3], 6, share=0.5, ratio=0.0, overhead=0.0) == 0  # rarely accepted: never
    assert best_draft_length([None, None], 6, share=0.1, ratio=0.0, overhead=0.0) == 0  # no row takes a draft
    # a check of many tokens at 16 rows costs more than one of few: shorter drafts there
    one_row = best_draft_length([0.9], 6, share=0.5, ratio=0.05, overhead=0.1)
    many = best_draft_length([0.9] * 16, 6, share=0.5, ratio=0.05, overhead=0.1)
    assert one_row > many


def test_choose_times_a_plain_step_first_then_follows_measured_costs():
    self_draft = SelfDraft(model=None, config=QuantizedSelfConfig("int4", 6))
    assert self_draft.choose([0.98], 0.0, 0.0) == 0  # no plain step timed at this size yet
    self_draft.observe(1, 0.010)
    assert self_draft.choose([0.98], 0.0, 0.0) > 0  # the prior: a draft step ~0.6 of a plain one
    self_draft.observe(1, 6 * 0.012, drafted=6)  # measured: a draft step costs more than a plain step
    for _ in range(8):
        self_draft.observe(1, 6 * 0.012, drafted=6)
    assert self_draft.choose([0.98], 0.0, 0.0) == 0
    assert self_draft.choose([0.98, 0.98], 0.0, 0.0) == 0  # 2 rows: another size, its plain step first
    plain_steps = 0
    while self_draft.choose([0.98], 0.0, 0.0) == 0 and plain_steps < 200:  # plain steps, as the scheduler times
        self_draft.observe(1, 0.010)
        plain_steps += 1
    assert 32 < plain_steps < 100  # then the draft's figure is old, and a draft is tried again


@pytest.mark.parametrize("raw, setting", [
    ({"method": "quantized_self", "quantization": "nf4"}, "speculative_config.quantization"),
    ({"method": "quantized_self", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "quantized_self", "prompt_lookup_max": 3}, "speculative_config.prompt_lookup_max"),
])
def test_bad_configurations_are_refused_naming_the_key(raw, setting):
    with pytest.raises(ConfigError) as err:
        torch_speculation(raw)
    assert err.value.setting == setting


def test_configuration_reading_and_where_it_cannot_run(tiny_model_dir):
    assert torch_speculation({"method": "quantized_self"}) == QuantizedSelfConfig("int4", 6)
    assert torch_speculation({"method": "quantized_self", "quantization": "int8", "num_speculative_tokens": 3}) == \
        QuantizedSelfConfig("int8", 3)
    assert "torch engine only" in speculative_unsupported({"method": "quantized_self"})
    with pytest.raises(ConfigError, match="served quantized"):
        TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization="int8",
                         self_draft=QuantizedSelfConfig())


def test_settings_build_an_engine_that_drafts(tiny_model_dir):
    from server.engines.factory import build_engines
    from server.settings import load_settings

    settings = load_settings(model=str(tiny_model_dir), dtype="float32",
                             speculative_config={"method": "quantized_self", "num_speculative_tokens": 2})
    engine = build_engines(settings)[settings.model_id]
    assert engine._scheduler.self_draft.config == QuantizedSelfConfig("int4", 2)
    assert engine._scheduler.lookup is None
    # the copy shares the embedding; its linears are quantized, the model's are not
    draft = engine._scheduler.self_draft.model
    assert draft.get_input_embeddings() is engine.model.get_input_embeddings()
    assert type(draft.model.layers[0].mlp.down_proj).__name__ == "Int4Linear"
    assert type(engine.model.model.layers[0].mlp.down_proj).__name__ != "Int4Linear"
