"""Prompt-lookup speculation (speculative_config method ngram) in the PyTorch engine: a batch of rows
with drafts gives exactly the tokens, text and finish reasons of the engine without it (greedy rows,
stop strings, max_tokens, EOS, penalties, logprobs; a seeded sampled row, drafted for too, draws the
same); drafts are proposed and partly accepted; a row whose drafts fail stops proposing; bad configurations are refused."""

from __future__ import annotations

import asyncio

import pytest

from engine_run import FreeTokens
from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.speculation_config import NgramConfig, ngram_config, vllm_speculative_config
from server.engines.torch.engine import TorchEngine
from server.engines.torch.prompt_lookup import NgramIndex, RowDraft, StepCost
from server.errors import ConfigError
from tests.tiny_model import build_tiny_model

LOOKUP = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)

# (prompt, params): repeated text so that drafts exist; each row ends a different way
ROWS = [
    ("Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Numbers: 0 1 2", {"max_tokens": 48}),
    ("The quick brown fox jumps over the lazy dog. The quick brown", {"max_tokens": 40, "stop": ["lazy", "og."]}),
    ("Hello, world! How are you today? Hello, world!", {"max_tokens": 33}),
    ("A language model predicts the next token. A language", {"max_tokens": 37, "frequency_penalty": 0.5}),
    ("The capital of France is Paris. The capital of", {"max_tokens": 30, "logprobs": 2}),
    ("Servers batch requests together. Servers", {"max_tokens": 1}),
    ("Low-rank adapters specialise a base model cheaply.", {"max_tokens": 45, "stop_token_ids": [5]}),
    ("The quick brown fox jumps", {"max_tokens": 25, "temperature": 0.8, "seed": 7}),  # sampled, seeded
]


def _run(engine: TorchEngine, rows) -> list[tuple]:
    async def one(i, prompt, params):
        params = {"temperature": 0.0, **params}
        req = GenerationRequest(f"r{i}", engine.encode(prompt), SamplingParams(**params), RequestStats("tiny"))
        ids, text, finish, logprobs = [], "", None, []
        async for chunk in engine.generate(req):
            ids += chunk.token_ids
            text += chunk.text
            finish = chunk.finish_reason or finish
            logprobs += [(lp.token, round(lp.logprob, 3)) for lp in chunk.logprobs or []]
        return ids, text, finish, logprobs

    async def go():
        return await asyncio.gather(*(one(i, p, params) for i, (p, params) in enumerate(rows)))

    return asyncio.run(go())


def _model(folder, attention: float):
    """The tiny model with its attention and MLP outputs scaled by `attention` (MLP: 0 unless 1): at 0
    each token's successor is fixed (a bigram model), so greedy text falls into a cycle and drafts are
    accepted; at 0.01 the context moves some tokens; at 1 (the random model) nearly every draft fails."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(folder)
    if attention != 1:
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(attention)
                layer.mlp.down_proj.weight.mul_(0.0)
        model.save_pretrained(path)
    return path


def _pair(path):
    plain = TorchEngine.load("tiny", path, dtype="float32")
    lookup = TorchEngine.load("tiny", path, dtype="float32", lookup=LOOKUP)
    lookup._scheduler.step_cost = FreeTokens()
    for engine in (plain, lookup):
        asyncio.run(engine.start())
    return plain, lookup


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    plain, lookup = _pair(_model(tmp_path_factory.mktemp("bigram") / "model", 0.0))
    yield plain, lookup
    for engine in (plain, lookup):
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("attention", [0.0, 0.01, 1.0])
def test_batched_greedy_output_is_unchanged(tmp_path, attention):
    plain, lookup = _pair(_model(tmp_path / "model", attention))
    try:
        want = _run(plain, ROWS)
        got = _run(lookup, ROWS)
        for (prompt, _), a, b in zip(ROWS, got, want):
            assert a == b, prompt
        stats = lookup.stats()
        assert stats.spec_draft_tokens > 0  # the draft path really ran
        if attention < 1:
            assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # accepted, some cut short
        assert plain.stats().spec_draft_tokens == 0
    finally:
        for engine in (plain, lookup):
            asyncio.run(engine.shutdown())


def test_each_row_alone_is_unchanged_too(engines):
    plain, lookup = engines
    for row in ROWS[:3]:
        assert _run(lookup, [row]) == _run(plain, [row])


def test_rejected_drafts_leave_holes_that_get_compacted(engines):
    plain, lookup = engines
    rows = [(p, {**params, "max_tokens": 120}) for p, params in ROWS[:4]]
    before = lookup._scheduler.runner.compactions
    assert _run(lookup, rows) == _run(plain, rows)
    assert lookup._scheduler.runner.compactions > before


def test_ngram_index_finds_the_latest_earlier_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert index.propose(tokens, 2) == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert index.propose(tokens + [7], 3) == [8, 1, 2]  # the index grows with the text
    assert NgramIndex(2, 3).propose([5, 6, 7], 4) == []


def test_a_row_whose_drafts_fail_stops_proposing():
    row = RowDraft(NgramConfig(num_speculative_tokens=4, prompt_lookup_max=2, prompt_lookup_min=1))
    tokens = [1, 2, 3, 4] * 8
    proposals = 0
    for _ in range(40):
        draft = row.propose(tokens, room=100)
        if draft:
            proposals += 1
            row.observe(len(draft), 0)
    assert proposals < 10  # stopped after a few failures, retried rarely


def test_draft_length_follows_acceptance():
    row = RowDraft(NgramConfig(num_speculative_tokens=6, prompt_lookup_max=2, prompt_lookup_min=1))
    tokens = list(range(10)) * 4
    lengths = []
    for _ in range(6):
        draft = row.propose(tokens, room=100)
        lengths.append(len(draft))
        row.observe(len(draft), len(draft))
    assert lengths == sorted(lengths) and lengths[-1] == 6
    row.observe(6, 1)
    assert len(row.propose(tokens, room=100)) == 2
    assert len(row.propose(tokens, room=1)) == 1  # never past max_tokens


@pytest.mark.parametrize("raw,setting", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "speculative_config.method"),
    ({"method": "ngram", "lookahead": 3}, "speculative_config.lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
])
def test_bad_configurations_are_refused_naming_the_key(raw, setting):
    with pytest.raises(ConfigError) as err:
        ngram_config(raw)
    assert err.value.setting == setting


def test_vllm_names_and_defaults():
    assert ngram_config({"method": "ngram"}) == NgramConfig()
    assert ngram_config({"method": "ngram", "prompt_lookup_max": 6}) == NgramConfig(4, 6, 2)
    assert vllm_speculative_config({"method": "ngram", "num_speculative_tokens": 3}) == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    other = {"method": "eagle", "model": "x", "num_speculative_tokens": 2}
    assert vllm_speculative_config(other) == other


def test_settings_and_factory_refuse_other_methods_on_torch(tiny_model_dir):
    from server.engines.factory import build_engines
    from server.settings import load_settings

    settings = load_settings(model=str(tiny_model_dir), speculative_config={"method": "medusa"})
    with pytest.raises(ConfigError, match="ngram"):
        build_engines(settings)
    settings = load_settings(model=str(tiny_model_dir), dtype="float32",
                             speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    engine = build_engines(settings)[settings.model_id]
    assert engine._scheduler.lookup == NgramConfig(3, 4, 2)


def test_width_follows_cost_and_acceptance():
    from server.engines.torch.prompt_lookup import choose_width

    drafts = [[1, 2, 3, 4]] * 2
    assert choose_width(drafts, [0.9, 0.9], ratio=0.0) == 4  # free extra tokens: the whole draft
    assert choose_width(drafts, [0.3, 0.3], ratio=1.0) == 0  # costly tokens, poor drafts: none
    assert choose_width(drafts, [0.9, 0.9], ratio=1.0) == 2  # good drafts pay even so, up to a point
    assert choose_width([[1, 2, 3, 4]] + [[]] * 15, [0.9] + [0.0] * 15, ratio=1 / 32) == 0  # one row of 16
    from server.engines.torch.prompt_lookup import choose_widths  # each row fed only its own draft

    assert choose_widths(drafts, [0.9, 0.9], ratio=0.0) == [4, 4]
    assert choose_widths(drafts, [0.3, 0.3], ratio=1.0) == [0, 0]
    assert choose_widths(drafts, [0.9, 0.3], ratio=0.2) == [4, 0]  # each row on its own acceptance
    assert choose_widths([[1, 2, 3, 4]] + [[]] * 15, [0.9] + [0.0] * 15, ratio=1 / 32) == [4] + [0] * 15
    assert choose_widths([[1, 2], [1, 2, 3, 4]], [0.9, 0.9], ratio=0.0) == [2, 4]
    cost = StepCost()
    for n, t in [(1, 0.05), (5, 0.06), (16, 0.08), (80, 0.21), (1, 0.05), (16, 0.08)]:
        cost.observe(n, t)
    ratio, overhead = cost.shares()
    assert 0.03 < ratio < 0.05 and overhead == cost.prior_overhead  # a = 0.048, b = 0.002; no draft check yet
    cost = StepCost()  # a = 0.048, b = 0.002, a draft check 0.012 more
    for n, draft in [(16, False), (20, True), (1, False), (40, True), (16, False), (17, True), (80, True), (8, False)]:
        cost.observe(n, 0.048 + 0.002 * n + 0.012 * draft, draft=draft)
    assert cost.shares() == pytest.approx((0.002 / 0.048, 0.012 / 0.048), rel=1e-6)
    cost = StepCost()  # one row: plain steps of 1 token, checks of 5 only (no spread among them)
    for i in range(12):
        cost.observe(5 if i % 2 else 1, 0.030 + 0.001 * (5 if i % 2 else 1) + 0.003 * (i % 2), draft=bool(i % 2))
    ratio, overhead = cost.shares()  # one line through both kinds: b takes the checks' own cost, c is the prior
    assert ratio == pytest.approx(0.00175 / 0.02925, rel=1e-6) and overhead == cost.prior_overhead
    cost = StepCost()  # draft checks only
    for n in (3, 5, 9, 5, 3, 9):
        cost.observe(n, 0.046 + 0.002 * n, draft=True)
    ratio, overhead = cost.shares()
    assert overhead == pytest.approx(cost.prior_overhead) and ratio == pytest.approx(0.002 / (0.046 / 1.15))
    # a draft check's fixed cost can outweigh one row's good draft in a batch of 16
    one_row = ([[1, 2, 3, 4]] + [[]] * 15, [0.9] + [0.0] * 15)
    assert choose_widths(*one_row, ratio=1 / 32, overhead=0.0) == [4] + [0] * 15
    assert choose_widths(*one_row, ratio=1 / 32, overhead=0.5) == [0] * 16
    assert choose_width(drafts, [0.9, 0.9], ratio=0.0, overhead=0.5) == 4
    assert choose_width(drafts, [0.3, 0.3], ratio=0.0, overhead=0.5) == 0


def test_vllm_ngram_gives_the_same_greedy_text(tmp_path):
    """vLLM's own ngram proposer (speculative_config passed through), on the CPU build: greedy text equals
    transformers' greedy text, and its draft counters reach slimserve's metrics."""
    import os

    import httpx
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import ServerProcess, vllm_available

    if not vllm_available():
        if os.environ.get("SLIMSERVE_REQUIRE_VLLM"):
            pytest.fail("SLIMSERVE_REQUIRE_VLLM is set but vllm is not installed")
        pytest.skip("vllm is not installed")
    path = _model(tmp_path / "model", 0.0)  # the bigram model: its greedy text repeats, drafts are accepted
    config = {"dtype": "float32", "models": [{
        "name": "tiny", "model": str(path), "engine": "vllm", "kv_cache_memory_bytes": 256 << 20,
        "gpu_memory_utilization": 0.1, "enforce_eager": True,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess(["--config", str(tmp_path / "serve.yaml")], env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                           log_path=tmp_path / "server.log")
    try:
        server.wait_ready(300)
        assert "ngram" in (tmp_path / "server.log").read_text()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for prompt, _ in ROWS[:3]:
            got = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            }).json()["choices"][0]["text"]
            ids = tok(prompt, return_tensors="pt").input_ids
            ref = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, min_new_tokens=30)
            want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
            assert got.rstrip("\ufffd") == want.rstrip("\ufffd")  # vLLM holds back a last half character
        metrics = httpx.get(f"{server.base_url}/metrics").text
        accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("slimserve_spec_decode_num_accepted_tokens_total")]
        assert accepted and accepted[0] > 0
    finally:
        server.stop()


def test_draft_counters_reach_metrics():
    from server.engines.base import EngineStats
    from server.metrics import Metrics

    metrics = Metrics()
    metrics.render({"m": EngineStats(running=0, waiting=0, spec_drafts=2, spec_draft_tokens=7, spec_accepted_tokens=5)})
    text = metrics.render({"m": EngineStats(running=0, waiting=0, spec_drafts=3, spec_draft_tokens=9,
                                            spec_accepted_tokens=6)}).decode()
    assert 'slimserve_spec_decode_num_drafts_total{model="m"} 3.0' in text
    assert 'slimserve_spec_decode_num_draft_tokens_total{model="m"} 9.0' in text
    assert 'slimserve_spec_decode_num_accepted_tokens_total{model="m"} 6.0' in text
