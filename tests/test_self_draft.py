"""Self-speculation (speculative_config method quantized_self): the model's own int4/int8 copy drafts,
the model checks. Output equals the engine without it (fp32, greedy rows batched with sampled ones, stop
strings, max_tokens, penalties, logprobs), eager and compiled; the cache is left as it was after
drafting; the draft length follows measured costs; configurations it cannot run are refused at start."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine_run import FreeTokens
from server.engines.speculation_config import NgramConfig, QuantizedSelfConfig, speculative_unsupported, \
    torch_speculation
from server.engines.torch import linear_op
from server.engines.torch.engine import TorchEngine
from server.engines.torch.runner import ModelRunner
from server.engines.torch.self_draft import _REFRESH, SelfDraft, best_draft_length
from server.errors import ConfigError
from test_prompt_lookup import ROWS, _run


SAMPLED = [(prompt, {"max_tokens": 24, "temperature": t, "seed": seed, **extra})
           for seed, (prompt, t, extra) in enumerate([
               ("The quick brown fox", 0.7, {}), ("Numbers: 0 1 2 3", 1.0, {"top_p": 0.9}),
               ("Hello, world!", 0.5, {"top_k": 5}), ("A language model", 0.8, {"frequency_penalty": 0.4}),
               ("The capital of France", 1.2, {"min_p": 0.05}), ("Servers batch", 0.3, {"logprobs": 2})] * 2)]


def _always_draft(engine: TorchEngine) -> SelfDraft:
    """Draft the most tokens whenever a row can take a draft (these tests are about exactness, and the
    tiny model's timings would decide otherwise now and then)."""
    self_draft = engine._scheduler.self_draft
    self_draft.choose = lambda chances, ratio, overhead, packed=True, most=99, others=(): min(
        self_draft.max_tokens, most) if any(c is not None for c in chances) else 0
    self_draft.wants_plain = lambda rows: False
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
        rows = ROWS + SAMPLED[:6]  # sampled rows too: the packed check's logits are a plain step's
        assert _run(engine, rows) == _run(plain, rows)
        assert self_draft.compiled.steps > 0 and engine._scheduler.runner.compiled.draft_steps > 0
        assert self_draft.compiled.failures == 0 and engine._scheduler.runner.compiled.draft_failures == 0
        # the copy's graph runs the copy's int4 layers, the model's graph the model's own
        kinds = {type(linear_op._layer(slot)).__name__ for slot in self_draft.compiled.graph.slots}
        assert "Int4Linear" in kinds and "Linear" not in kinds and "OneDNNLinear" not in kinds
        assert "Int4Linear" not in {type(linear_op._layer(slot)).__name__
                                    for slot in engine._scheduler.runner.compiled.graph.slots}
        # and its step gives the copy's eager logits (and not the model's)
        runner = ModelRunner(self_draft.model, engine.device, engine._scheduler.runner.pad_id)
        prompt = engine.encode("The quick brown fox jumps over")
        with torch.inference_mode():
            runner.join(runner.prefill([prompt[:-1]])[1])
            ids, pos = torch.tensor([[prompt[-1]]]), torch.tensor([[len(prompt) - 1]])
            compiled_logits = runner._step(self_draft.model, self_draft.compiled, ids, pos)[0]
            eager = self_draft.model(torch.tensor([prompt])).logits[0, -1]
            model = engine.model(torch.tensor([prompt])).logits[0, -1]
        copy_gap, model_gap = (compiled_logits - eager).abs().max(), (compiled_logits - model).abs().max()
        assert copy_gap < 0.05 * model_gap, (copy_gap, model_gap)
    finally:
        asyncio.run(engine.shutdown())


def test_look_ahead_drafts_the_greedy_continuation_and_leaves_the_cache_as_it_was(tiny_model_dir):
    """With the model itself as the drafter, look_ahead's tokens are the model's greedy continuation (the
    positions, mask and cache columns of each step are right); after it, cache and mask are as before."""
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    runner = engine._scheduler.runner
    drafter = SelfDraft(engine.model, QuantizedSelfConfig("int4", 4))
    long = engine.encode("Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. " * 4)[:62]  # drafting outgrows the buffers
    prompts = [engine.encode("The quick brown fox"), long]
    with torch.inference_mode():
        logits, rows = runner.prefill(prompts)
        runner.join(rows)
        first = logits[:, -1].argmax(-1).tolist()
        length, mask = runner.cache.length, runner.mask.clone()
        capacity = runner.cache.layers[0]._k.shape[2]
        keys = runner.cache.layers[0].keys.clone()
        tokens = runner.look_ahead(drafter, first, [len(p) for p in prompts], 4, limit=10_000)
        assert runner.cache.layers[0]._k.shape[2] > capacity  # the buffers grew while drafting
        assert runner.cache.length == length and torch.equal(runner.mask, mask)
        assert torch.equal(runner.cache.layers[0].keys, keys)
        for prompt, t0, drafted in zip(prompts, first, tokens):
            full = torch.tensor([prompt + [t0] + drafted[:3]])
            assert engine.model(full).logits[0, -4:].argmax(-1).tolist() == drafted


def test_a_failing_draft_costs_only_itself(tiny_model_dir, plain):
    """A draft that raises: the cache is rolled back, the step runs plain, every request completes with the
    model's own output; after three failures drafting stops."""
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", self_draft=QuantizedSelfConfig("int4", 4))
    self_draft = _always_draft(engine)
    model = self_draft.model
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 0:  # a draft's second step: the first step's keys are in the cache
            raise RuntimeError("injected draft failure")
        return model(*args, **kwargs)

    self_draft.model = broken
    asyncio.run(engine.start())
    try:
        assert _run(engine, ROWS) == _run(plain, ROWS)
        assert self_draft.failures == 3 and not self_draft.usable and "injected" in self_draft.last_error
        assert engine.health()
    finally:
        asyncio.run(engine.shutdown())


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
    # a dense check (eager) makes rows without a draft pay for the others' tokens too
    # a row whose prompt-lookup draft is checked anyway: the copy's steps would hold it back
    assert best_draft_length([0.97, None], 6, 0.3, 0.05, 0.1) == 6
    assert best_draft_length([0.97, None], 6, 0.3, 0.05, 0.1, others=[(0.9, 4)]) == 0
    mixed = [0.99] + [None] * 3
    assert best_draft_length(mixed, 6, 0.1, 0.05, 0.05) == 6
    assert best_draft_length(mixed, 6, 0.1, 0.05, 0.05, packed=False) == 0


def test_choose_times_a_plain_step_first_then_follows_measured_costs():
    self_draft = SelfDraft(model=None, config=QuantizedSelfConfig("int4", 6))
    assert self_draft.wants_plain(1)  # no plain step timed at this size yet
    self_draft.observe(1, 0.010)
    assert not self_draft.wants_plain(1)
    assert self_draft.choose([0.98], 0.0, 0.0) > 0  # the prior: a draft step ~0.6 of a plain one
    for _ in range(9):  # measured: a draft step costs more than a plain step
        self_draft.observe(1, 6 * 0.012, drafted=6)
    assert self_draft.choose([0.98], 0.0, 0.0) == 0
    assert self_draft.wants_plain(2)  # 2 rows: another size, its plain step first
    plain_steps = 0
    while plain_steps < 200:  # steps as the scheduler runs them: plain unless a draft is chosen
        if not self_draft.wants_plain(1) and self_draft.choose([0.98], 0.0, 0.0) > 0:
            break
        self_draft.observe(1, 0.010)
        plain_steps += 1
    assert 32 < plain_steps < 100  # then the draft's figure is old, and a draft is tried again
    # while drafting pays, a plain step is still timed now and then (no drafts of any kind that step)
    self_draft.observe(1, 6 * 0.004, drafted=6)
    wanted = [self_draft.wants_plain(1) for _ in range(_REFRESH + 2)]
    assert wanted[-1] and not any(wanted[:_REFRESH - 2])


@pytest.mark.parametrize("raw, setting", [
    ({"method": "quantized_self", "quantization": "nf4"}, "speculative_config.quantization"),
    ({"method": "quantized_self", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "quantized_self", "lookahead": 3}, "speculative_config.lookahead"),
    ({"method": "quantized_self", "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_min"),
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
    with pytest.raises(ConfigError, match="only as its `lookup`"):
        TorchEngine.load("tiny", tiny_model_dir, dtype="float32", lookup=NgramConfig(), self_draft=QuantizedSelfConfig())
    from server.engines.factory import check_speculative
    from server.settings import load_settings

    settings = load_settings(model=str(tiny_model_dir), quantization="int4",
                             speculative_config={"method": "quantized_self"})
    with pytest.raises(ConfigError, match="served quantized"):  # refused before anything loads
        check_speculative(settings, "speculative_config")


def test_settings_build_an_engine_that_drafts(tiny_model_dir):
    from server.engines.factory import build_engines
    from server.settings import load_settings

    settings = load_settings(model=str(tiny_model_dir), dtype="float32",
                             speculative_config={"method": "quantized_self", "num_speculative_tokens": 2})
    engine = build_engines(settings)[settings.model_id]
    assert engine._scheduler.self_draft.config == QuantizedSelfConfig("int4", 2)
    assert engine._scheduler.lookup is None
    # the copy shares the embedding and norms' tensors; its linears are quantized, the model's are not
    draft = engine._scheduler.self_draft.model
    assert draft.get_input_embeddings().weight is engine.model.get_input_embeddings().weight
    assert draft.model.norm.weight is engine.model.model.norm.weight
    assert type(draft.model.layers[0].mlp.down_proj).__name__ == "Int4Linear"
    assert type(engine.model.model.layers[0].mlp.down_proj).__name__ != "Int4Linear"
    # what drafting adds to memory is counted with the model's weights, and /v1/models says what speculates
    from compress.load_time import weight_bytes

    extra = engine._scheduler.self_draft.extra_bytes
    assert 0 < extra < weight_bytes(engine.model) and engine.weight_bytes == weight_bytes(engine.model) + extra
    assert engine.speculation.startswith("quantized_self: the model's int4 copy drafts up to 2 tokens")


def test_prompt_lookup_first_then_the_copy(tiny_model_dir, plain):
    """quantized_self with prompt_lookup_max/min: rows prompt lookup finds a draft for take it, the others
    the copy's; output unchanged, both kinds of draft checked."""
    config = torch_speculation({"method": "quantized_self", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                "prompt_lookup_min": 1})
    assert config.lookup == NgramConfig(3, 3, 1)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", self_draft=config)
    _always_draft(engine)
    scheduler = engine._scheduler
    assert scheduler.lookup == config.lookup
    assert engine.speculation.startswith("ngram: prompt lookup first (n-grams of 1-3, up to 3 tokens); quantized_self")
    sources = []  # per checked step: which kinds of draft it held
    check = scheduler._decode_drafts

    def recording(rows, drafts, judges, started):
        sources.append({type(j).__name__ for j, d in zip(judges, drafts) if d})
        return check(rows, drafts, judges, started)

    scheduler._decode_drafts = recording
    asyncio.run(engine.start())
    try:
        assert _run(engine, ROWS) == _run(plain, ROWS)
        assert {"RowDraft", "AcceptanceChance"} in sources  # one check held both kinds of draft
    finally:
        asyncio.run(engine.shutdown())


def test_sampled_rows_take_drafts_and_draw_what_they_drew_without(tiny_model_dir, plain):
    """Sampled rows are drafted for too: a drafted token stays only where the row's own sample equals it, so
    every seeded request gives exactly what it gives without speculation (the same distribution, the same
    random numbers), while drafts are checked and some accepted."""
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", self_draft=QuantizedSelfConfig("int4", 4))
    _always_draft(engine)
    asyncio.run(engine.start())
    try:
        rows = [(p, {**params, "seed": params["seed"] + 100 * rep}) for rep in range(3) for p, params in SAMPLED]
        assert _run(engine, rows) == _run(plain, rows)
        stats = engine.stats()
        assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0
    finally:
        asyncio.run(engine.shutdown())


def test_served_over_http_with_the_openai_client(tmp_path, tiny_model_dir):
    """A real server with two entries of the tiny model, one drafting with its int4 copy: the openai
    client gets the same greedy text from both, the engine drafts by its own measured choice (a new
    batch size is timed plain, then drafted with the prior), and the draft counters reach /metrics."""
    import httpx
    import openai
    import yaml

    from tests.conftest import ServerProcess

    config = {"dtype": "float32", "models": [
        {"name": "plain", "model": str(tiny_model_dir)},
        {"name": "drafted", "model": str(tiny_model_dir), "speculative_config": {"method": "quantized_self"}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess(["--config", str(tmp_path / "serve.yaml")], log_path=tmp_path / "server.log")
    try:
        server.wait_ready(120)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        for prompt, _ in ROWS[:4]:
            texts = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=24, temperature=0).choices[0].message.content
                     for name in ("plain", "drafted")]
            assert texts[0] == texts[1]
        cards = {c["id"]: c for c in client.models.list().model_dump()["data"]}
        assert "quantized_self" in cards["drafted"]["speculation"] and "speculation" not in cards["plain"]
        assert cards["drafted"]["weight_bytes"] > cards["plain"]["weight_bytes"]
        metrics = httpx.get(f"{server.base_url}/metrics").text
        drafted = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("slimserve_spec_decode_num_draft_tokens_total")}
        assert drafted.get('model="drafted"', 0) > 0 and drafted.get('model="plain"', 0) == 0
        assert "self-speculation draft" in (tmp_path / "server.log").read_text()  # the copy was built
    finally:
        server.stop()


def test_grammar_constrained_rows_take_drafts_and_keep_their_output(tiny_model_dir, plain):
    """A constrained row's pick at each drafted position is masked by its matcher after the tokens before
    it (the draft's own tokens reach the matcher only once accepted): JSON-schema and JSON-object rows,
    greedy and seeded, give what they give without drafts, and their drafts are checked."""
    import json

    from server.engines.base import Guide

    schema = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "sunny": {"type": "boolean"}},
                         "required": ["city", "sunny"], "additionalProperties": False}, sort_keys=True)
    rows = [("Weather in London as JSON", {"max_tokens": 40, "guide": Guide(json_schema=schema)}),
            ("Any JSON object", {"max_tokens": 30, "guide": Guide(json_object=True)}),
            ("Weather in Paris as JSON", {"max_tokens": 40, "temperature": 0.8, "seed": 3,
                                          "guide": Guide(json_schema=schema)}),
            *ROWS[:2]]
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", self_draft=QuantizedSelfConfig("int4", 4))
    _always_draft(engine)
    checked = []
    check = engine._scheduler._decode_drafts

    def recording(seqs, drafts, judges, started):
        checked.extend(bool(d) for s, d in zip(seqs, drafts) if s.row.matcher is not None)
        return check(seqs, drafts, judges, started)

    engine._scheduler._decode_drafts = recording
    asyncio.run(engine.start())
    try:
        got, want = _run(engine, rows), _run(plain, rows)
        assert got == want
        for _, text, finish, _ in got[:3]:
            if finish == "stop":  # a finished constrained answer parses
                json.loads(text)
        assert any(checked)  # constrained rows' drafts were checked
    finally:
        asyncio.run(engine.shutdown())
