"""Speculative decoding in the PyTorch engine: with a draft attached, greedy output (tokens, text,
finish reason) is exactly the model's own; ineligible requests take the batching path."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.torch.engine import TorchEngine
from server.errors import ConfigError
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("draft") / "model", seed=1, layers=1)


def _run(engine, prompt: str, **params) -> tuple[list[int], str, str]:
    async def go():
        req = GenerationRequest("r", engine.encode(prompt), SamplingParams(temperature=0.0, **params),
                                RequestStats("tiny"))
        ids, text, finish = [], "", None
        async for chunk in engine.generate(req):
            ids += chunk.token_ids
            text += chunk.text
            finish = chunk.finish_reason or finish
        return ids, text, finish

    return asyncio.run(go())


@pytest.fixture(scope="module")
def engines(tiny_model_dir, student_dir):
    plain = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    spec = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    spec.attach_draft(str(student_dir), 3, adaptive=False)  # every lone greedy request through the draft
    for engine in (plain, spec):
        asyncio.run(engine.start())
    yield plain, spec
    asyncio.run(plain.shutdown())
    asyncio.run(spec.shutdown())


@pytest.mark.parametrize("prompt,params", [
    ("The capital of France is", {"max_tokens": 40}),
    ("Hello, world! How are", {"max_tokens": 25}),
    ("A language model", {"max_tokens": 30, "stop": ["the", "er"]}),
    ("Numbers: 0 1 2", {"max_tokens": 1}),
])
def test_same_greedy_output_as_the_model_alone(engines, prompt, params):
    plain, spec = engines
    before = spec.speculative.requests
    assert _run(spec, prompt, **params) == _run(plain, prompt, **params)
    assert spec.speculative.requests == before + 1  # it really went through assisted generation


def test_ineligible_requests_use_the_batch(engines):
    _, spec = engines
    before = spec.speculative.requests
    ids, _, _ = _run(spec, "Hello", max_tokens=5, ignore_eos=True)
    assert len(ids) == 5 and spec.speculative.requests == before


def test_judge_measures_both_paths_then_takes_the_faster():
    from server.engines.torch.speculation_judge import MIN_TOKENS, SpeculationJudge

    judge = SpeculationJudge()
    assert [judge.choose() for _ in range(3)] == ["draft"] * 3  # nothing measured: the draft first
    for _ in range(3):
        judge.observe("draft", 40, 0.8)  # 20 ms a token
    judge.observe("plain", MIN_TOKENS - 1, 0.01)  # too short to count
    assert judge.samples == {"draft": 3, "plain": 0} and judge.choose() == "plain"
    for _ in range(3):
        judge.observe("plain", 40, 0.4)  # 10 ms a token: the draft does not pay
    assert judge.speedup() == pytest.approx(0.5)
    probes = []  # decisions at which the draft was re-measured
    for i in range(400):
        if judge.choose() == "draft":
            probes.append(i)
            judge.observe("draft", 40, 0.8)  # still slow: each probe doubles the wait for the next
    assert probes == [15, 47, 111, 239] and judge.probes == 4
    while judge.choose() != "draft":  # the next probe finds the draft faster now (5 ms a token) ...
        pass
    judge.observe("draft", 40, 0.2)
    assert judge.speedup() == pytest.approx(2.0)  # ... its fresh figure counts whole
    assert [judge.choose() for _ in range(10)].count("draft") >= 9

    judge = SpeculationJudge()  # answers too short to measure: warm-up still ends
    picks = [judge.choose() for _ in range(14)]
    assert picks[:6] == ["draft"] * 6 and picks[6:12] == ["plain"] * 6 and picks[12:] == ["plain"] * 2


def test_an_adaptive_engine_sends_lone_requests_where_they_decode_faster(tiny_model_dir, student_dir):
    """Measured on its own requests: the draft for the first three, the plain path for the next three,
    then the faster; greedy output is the model's own on both paths."""
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    engine.attach_draft(str(student_dir), 3)
    assert engine.speculation == f"draft model {student_dir} (lone greedy requests, while it measures faster)"
    asyncio.run(engine.start())
    try:
        judge, spec = engine.speculation_judge, engine.speculative

        def alone():  # a finished row leaves the batch just after its last chunk: wait, so the next runs alone
            while sum(engine._scheduler.counts()[:2]):
                time.sleep(0.005)
            return _run(engine, "The capital of France is", max_tokens=30)

        outputs = [alone() for _ in range(6)]
        assert all(o == outputs[0] for o in outputs) and len(outputs[0][0]) > 9
        assert spec.requests == 3 and judge.samples == {"draft": 3, "plain": 3}
        judge.seconds_per_token = {"draft": 0.05, "plain": 0.01}  # as if the draft were slow here
        before = spec.requests
        assert alone() == outputs[0]
        assert spec.requests == before
        judge.seconds_per_token = {"draft": 0.001, "plain": 0.01}
        assert alone() == outputs[0]
        assert spec.requests == before + 1
    finally:
        asyncio.run(engine.shutdown())


def test_draft_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    other = build_tiny_model(tmp_path / "other", seed=2, layers=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    with pytest.raises(ConfigError, match="different tokenizer"):
        engine.attach_draft(str(other), 3)


def test_vllm_draft_model_gives_the_same_greedy_text(tiny_model_dir, student_dir, tmp_path):
    """vLLM's draft-model speculative decoding, configured through `draft:` in serve.yaml."""
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
    config = {"dtype": "float32", "models": [{
        "name": "teacher", "model": str(tiny_model_dir), "engine": "vllm", "kv_cache_memory_bytes": 256 << 20,
        "gpu_memory_utilization": 0.1, "enforce_eager": True, "draft": str(student_dir),
        "num_speculative_tokens": 3}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess(["--config", str(tmp_path / "serve.yaml")], env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                           log_path=tmp_path / "server.log")
    try:
        server.wait_ready(300)
        assert "num_spec_tokens=3" in (tmp_path / "server.log").read_text()
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        for prompt in ("The capital of France", "Hello, world! How are you"):
            got = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": "teacher", "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            }).json()["choices"][0]["text"]
            ids = tok(prompt, return_tensors="pt").input_ids
            ref = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, min_new_tokens=20)
            assert got == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        server.stop()
