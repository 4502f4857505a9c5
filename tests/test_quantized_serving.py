"""Artifacts from `compress quantize` serve on both engines with a LoRA adapter on top: GPTQ 4-bit
(GPTQModel), and compressed-tensors W4A16 and W8A8 (llm-compressor).

The vLLM runs skip where vLLM's CPU build cannot serve the artifact here, for the reason the kernel
probe gives (server/engines/vllm_kernels.py: e.g. no cpu_gemm_wna16 on AVX2-only CPUs, W8A8 with
LoRA without AMX); the torch engine serves all of them everywhere."""

from __future__ import annotations

import httpx
import pytest

from adapter_factory import make_adapter
from compress.quantize import QuantizeSpec, quantize
from conftest import engine_flags
from server.engines.vllm_kernels import missing_for_model
from test_compress_quantize import require_llmcompressor

ARTIFACTS = {"gptq": ("gptqmodel", "gptq", "gptq"), "w4a16": ("llmcompressor", "gptq", "compressed-tensors"),
             "w8a8": ("llmcompressor", "int8", "compressed-tensors")}


@pytest.fixture(scope="module", params=list(ARTIFACTS))
def artifact(request, tiny_model_dir, tmp_path_factory):
    backend, method, _ = ARTIFACTS[request.param]
    if backend == "llmcompressor":
        require_llmcompressor()
    root = tmp_path_factory.mktemp(f"serving-{request.param}")
    calib = root / "calib.txt"
    calib.write_text("\n".join(f"Sentence {i} about servers, adapters and quantized weights." for i in range(100)))
    folder = root / "tiny-q"
    quantize(QuantizeSpec(model=tiny_model_dir, out=folder, method=method, backend=backend, group_size=64,
                          calib=calib if method == "gptq" else None, num_samples=16, seq_len=64))
    adapter = make_adapter(tiny_model_dir, root / "style", seed=3, scale_b=3.0)
    return request.param, folder, adapter


@pytest.fixture(scope="module")
def qserver(start_server, artifact, engine):
    _, folder, adapter = artifact
    if engine == "vllm" and (missing := missing_for_model(folder, lora=True)):
        pytest.skip(missing)
    flags = engine_flags(engine) + (["--dtype", "bfloat16"] if engine == "vllm" else [])
    return start_server(["--model", str(folder), "--served-model-name", "tiny-q", "--lora", f"style={adapter}",
                         *flags])


def _complete(base_url: str, model: str) -> str:
    r = httpx.post(base_url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "Hello, world!", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_quantized_artifact_serves_with_an_adapter(qserver, artifact):
    cards = {m["id"]: m for m in httpx.get(qserver.base_url + "/v1/models").json()["data"]}
    assert ARTIFACTS[artifact[0]][2] in str(cards["tiny-q"]["quantization"])
    assert cards["style"]["parent"] == "tiny-q"
    base = _complete(qserver.base_url, "tiny-q")
    assert base == _complete(qserver.base_url, "tiny-q")  # greedy replays
    assert _complete(qserver.base_url, "style") != base
