"""A GPTQ artifact from `compress quantize` serves on both engines, with a LoRA adapter on top."""

from __future__ import annotations

import httpx
import pytest

from adapter_factory import make_adapter
from compress.quantize import QuantizeSpec, quantize
from conftest import engine_flags


@pytest.fixture(scope="module")
def gptq_setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq-serving")
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"Sentence {i} about servers, adapters and quantized weights." for i in range(100)))
    folder = root / "tiny-gptq"
    quantize(QuantizeSpec(model=tiny_model_dir, out=folder, method="gptq", group_size=64, calib=calib,
                          num_samples=16, seq_len=64))
    adapter = make_adapter(tiny_model_dir, root / "style", seed=3, scale_b=3.0)
    return folder, adapter


@pytest.fixture(scope="module")
def qserver(start_server, gptq_setup, engine):
    folder, adapter = gptq_setup
    flags = engine_flags(engine) + (["--dtype", "bfloat16"] if engine == "vllm" else [])
    return start_server(["--model", str(folder), "--served-model-name", "tiny-gptq", "--lora", f"style={adapter}",
                         *flags])


def _complete(base_url: str, model: str) -> str:
    r = httpx.post(base_url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "Hello, world!", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_gptq_artifact_serves_with_an_adapter(qserver):
    cards = {m["id"]: m for m in httpx.get(qserver.base_url + "/v1/models").json()["data"]}
    assert "gptq" in str(cards["tiny-gptq"]["quantization"])
    assert cards["style"]["parent"] == "tiny-gptq"
    base = _complete(qserver.base_url, "tiny-gptq")
    assert base == _complete(qserver.base_url, "tiny-gptq")  # greedy replays
    assert _complete(qserver.base_url, "style") != base
