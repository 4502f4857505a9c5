"""Quantization at load time in the PyTorch engine: int8 and int4 on torch's packed CPU kernels
(int8 per channel, int4 in groups of 32, head included), nf4 through bitsandbytes.

KL bounds are relative to an unrelated model (the same tiny architecture, another seed): a
quantizer that kept nothing of the weights would score like it (~6.8 nats per token here). The
tiny random model (init std 0.25, so sharp logits) is far more sensitive than a trained one:
measured int8 0.008 nats (0.12% of unrelated), int4 0.72 (11%), nf4 0.97 (14%); the old fp4
(bitsandbytes) path measured 1.6 (23%). Bounds: int8 under 1% of unrelated, 4-bit under 35%: a
few times what we measure, far below a broken quantizer. A real server answers greedily with an
adapter on top of int8/int4 exactly as the in-process engine does.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from adapter_factory import make_adapter
from engine_run import greedy_tokens
from adapters.loader import load_lora
from server.engines.torch.engine import TorchEngine

BOUNDS = {"int8": 0.01, "nf4": 0.35, "int4": 0.35}  # fractions of the unrelated model's KL
PROMPTS = ["Hello, world!", "The capital of France is", "Numbers: 1 2 3", "Servers batch requests together."]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(" ".join(PROMPTS))])
    with torch.no_grad():
        return model(ids).logits.float()[0]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p || q)."""
    return float(torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean())


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return TorchEngine.load("tiny", tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def unrelated_kl(reference, tmp_path_factory):
    from tiny_model import build_tiny_model

    other = TorchEngine.load("other", build_tiny_model(tmp_path_factory.mktemp("other") / "m", seed=1),
                             dtype="float32")
    return _kl(_logits(reference.model, reference.tokenizer), _logits(other.model, reference.tokenizer))


@pytest.mark.parametrize("method", ["int8", "nf4", "int4"])
def test_quantized_logits_stay_close_and_weights_shrink(tiny_model_dir, reference, unrelated_kl, method):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization=method)
    kl = _kl(_logits(reference.model, reference.tokenizer), _logits(engine.model, engine.tokenizer))
    assert kl < BOUNDS[method] * unrelated_kl, f"{method}: mean KL {kl:.4g} vs unrelated {unrelated_kl:.4g}"
    assert kl > 0, "quantization should change the logits at least a little"
    assert engine.weight_bytes < reference.weight_bytes
    assert engine.quantization == method


def test_prequantized_and_load_time_together_is_refused(tiny_model_dir, tmp_path):
    import json
    import shutil

    from server.errors import ConfigError

    folder = shutil.copytree(tiny_model_dir, tmp_path / "claimed")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="already quantized"):
        TorchEngine.load("tiny", folder, quantization="int8")


def test_unknown_method_names_the_setting(tiny_model_dir):
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="'quantization'"):
        TorchEngine.load("tiny", tiny_model_dir, quantization="int3")


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_mixed_adapter_batch_on_quantized_base(tiny_model_dir, tmp_path, method):
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization=method)
    asyncio.run(engine.start())
    try:
        for i, name in enumerate(["a", "b"]):
            folder = make_adapter(tiny_model_dir, tmp_path / name, seed=20 + i)
            asyncio.run(engine.install_adapter(load_lora(name, folder, engine.base_shapes(), max_rank=64)))
        items = [(p, a) for p in PROMPTS for a in (None, "a", "b")]
        alone = [greedy_tokens(engine, [item], 10)[0] for item in items]
        assert greedy_tokens(engine, items, 10) == alone
        assert len({tuple(t) for t in alone}) > len(PROMPTS)
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_server_answers_with_an_adapter_on_torch_kernels(start_server, tiny_model_dir, tmp_path, method):
    import httpx

    from server.engines.torch.fused_projections import SharedProjection
    from server.engines.torch.int4_linear import Int4Linear
    from server.engines.torch.int8_linear import Int8Linear

    adapter = make_adapter(tiny_model_dir, tmp_path / "style", seed=3, scale_b=3.0)
    server = start_server(["--model", str(tiny_model_dir), "--served-model-name", "tiny-q", "--dtype", "float32",
                           "--quantization", method, "--lora", f"style={adapter}"])

    def complete(model: str) -> str:
        r = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    card = httpx.get(server.base_url + "/v1/models/tiny-q", timeout=30).json()
    assert card["quantization"] == method and card["dtype"] == "float32"
    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32", quantization=method)
    kind = Int8Linear if method == "int8" else Int4Linear
    q_proj = engine.lora.layers["model.layers.0.self_attn.q_proj"].base  # q/k/v: one quantized matmul
    assert isinstance(q_proj, SharedProjection) and isinstance(q_proj._group[0].layer, kind)
    assert isinstance(engine.lora.layers["model.layers.0.self_attn.o_proj"].base, kind)
    assert card["quantization_kernel"] == engine.quantization_kernel  # same activation dtype, so same tokens
    asyncio.run(engine.start())
    try:
        asyncio.run(engine.install_adapter(load_lora("style", adapter, engine.base_shapes(), max_rank=64)))
        expected = {name: engine.tokenizer.decode(greedy_tokens(engine, [(PROMPTS[1], name)], 12)[0])
                    for name in (None, "style")}
    finally:
        asyncio.run(engine.shutdown())
    assert complete("tiny-q") == expected[None]
    assert complete("style") == expected["style"]
    assert expected["style"] != expected[None]
