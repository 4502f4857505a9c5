"""`slimserve compress quantize` on the tiny model: artifacts that load, stay close, and say what they are.

The KL bound is relative to an unrelated model of the same shape (another seed), as in
test_load_time_quant: a quantizer that kept nothing would score like it. 4-bit with groups of 64
on the tiny random model measures well under a third of it (trained models fare far better:
SmolLM2's figures are in the README).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compress.manifest import read_manifest
from compress.quantize import QuantizeError, QuantizeSpec, llmcompressor_python, quantize
from server.engines.torch.engine import TorchEngine
from tests.engine_run import mean_kl, prompt_logits

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog near river number {i}." for i in range(200))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for method in ("gptq", "awq", "rtn"):
        spec = QuantizeSpec(model=tiny_model_dir, out=root / method, method=method, group_size=64,
                            calib=calib if method != "rtn" else None, num_samples=16, seq_len=64,
                            sym=method != "awq")
        out[method] = (root / method, quantize(spec))
    return out


def require_llmcompressor() -> None:
    import os

    if not llmcompressor_python().is_file():
        if os.environ.get("SLIMSERVE_REQUIRE_VLLM"):  # CI builds every environment
            pytest.fail(f"no llm-compressor environment at {llmcompressor_python()}")
        pytest.skip("the llm-compressor environment is not built (.ci/install builds it)")


@pytest.fixture(scope="module")
def ct_artifacts(tiny_model_dir, calib, tmp_path_factory):
    require_llmcompressor()
    root = tmp_path_factory.mktemp("compressed-tensors")
    out = {}
    for method in ("gptq", "int8"):
        spec = QuantizeSpec(model=tiny_model_dir, out=root / method, method=method, backend="llmcompressor",
                            group_size=64, calib=calib if method == "gptq" else None, num_samples=16, seq_len=64)
        out[method] = (root / method, quantize(spec))
    return out


@pytest.mark.parametrize("method", ["gptq", "int8"])
def test_llmcompressor_artifacts_are_compressed_tensors_and_load(tiny_model_dir, ct_artifacts, method, tmp_path):
    from tiny_model import build_tiny_model

    folder, report = ct_artifacts[method]
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert report["backend"] == "llmcompressor" and report["bits"] == (8 if method == "int8" else 4)
    ref = TorchEngine.load("ref", tiny_model_dir, dtype="float32")
    unrelated = TorchEngine.load("other", build_tiny_model(tmp_path / "other", seed=1), dtype="float32")
    engine = TorchEngine.load("ct", folder, dtype="float32")
    kl = _kl(_logits(ref), _logits(engine))
    bound = 0.01 if method == "int8" else 0.33  # fractions of an unrelated model's KL, as above
    assert kl < bound * _kl(_logits(ref), _logits(unrelated)), f"{method}: KL {kl:.4f}"


def _logits(engine) -> torch.Tensor:
    return prompt_logits(engine, TEXT[:400])


_kl = mean_kl


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_artifact_loads_stays_close_and_has_a_manifest(tiny_model_dir, artifacts, method, tmp_path):
    from tiny_model import build_tiny_model

    folder, report = artifacts[method]
    ref = TorchEngine.load("ref", tiny_model_dir, dtype="float32")
    unrelated = TorchEngine.load("other", build_tiny_model(tmp_path / "other", seed=1), dtype="float32")
    engine = TorchEngine.load("q", folder)
    assert engine.quantization.startswith({"rtn": "gptq"}.get(method, method))
    kl = _kl(_logits(ref), _logits(engine))
    assert kl < 0.33 * _kl(_logits(ref), _logits(unrelated)), f"{method}: KL {kl:.3f}"
    manifest = read_manifest(folder)
    assert manifest["method"] == method and manifest["bits"] == 4 and manifest["parameters"]["group_size"] == 64
    assert manifest["bytes_after"] < manifest["bytes_before"]
    assert (manifest["calibration_sha256"] is None) == (method == "rtn")
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 64


def _spec(model, tmp_path, calib_file, **kw):
    base = dict(model=model, out=tmp_path / "out", method="gptq", group_size=64, calib=calib_file)
    return QuantizeSpec(**{**base, **kw})


@pytest.mark.parametrize("change, message", [
    ({"group_size": 96}, "does not divide"),
    ({"method": "fp3"}, "method must be"),
    ({"bits": 5}, "bits must be"),
    ({"method": "awq", "bits": 8}, "4-bit"),
    ({"calib": None}, "needs calibration"),
    ({"backend": "llmcompressor", "method": "awq"}, "needs an accelerator"),
    ({"backend": "autogptq"}, "backend must be"),
])
def test_bad_inputs_fail_before_work(tiny_model_dir, tmp_path, calib, change, message):
    with pytest.raises(QuantizeError, match=message):
        quantize(_spec(tiny_model_dir, tmp_path, change.pop("calib", calib), **change))
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_and_non_causal_models(tiny_model_dir, tmp_path, calib):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QuantizeError, match="cannot read"):
        quantize(_spec(tiny_model_dir, tmp_path, bad))
    encoder = shutil.copytree(tiny_model_dir, tmp_path / "encoder")
    cfg = json.loads((encoder / "config.json").read_text())
    cfg["architectures"] = ["LlamaModel"]
    (encoder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizeError, match="not a causal language model"):
        quantize(_spec(encoder, tmp_path, calib))
    with pytest.raises(QuantizeError, match="no config.json"):
        quantize(_spec(tmp_path, tmp_path, calib))


def test_quantized_artifact_is_refused_as_input(artifacts, tmp_path, calib):
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(_spec(artifacts["gptq"][0], tmp_path, calib))
