"""Speculative decoding in the PyTorch engine: with a draft attached, greedy output (tokens, text,
finish reason) is exactly the model's own; ineligible requests take the batching path."""

from __future__ import annotations

import asyncio

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
    spec.attach_draft(str(student_dir), 3)
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
