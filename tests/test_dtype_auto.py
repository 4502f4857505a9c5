"""`dtype: auto` on the PyTorch engine (server/engines/torch/dtype_choice.py): bf16 where the CPU
computes bf16 natively, fp32 where it does not, the config's dtype on a GPU; the choice and its
reason on the model card. CPU flags are injected, so both kinds of CPU are tested on any machine."""

from __future__ import annotations

import httpx
import pytest
import torch

from server.engines.torch.dtype_choice import choose_dtype, native_bf16

CPU = torch.device("cpu")
AVX2_EPYC = {"avx2": True, "fma": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16_EPYC = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}
AMX_XEON = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}


@pytest.mark.parametrize("flags, capability, expected, word", [
    (AVX512_BF16_EPYC, "AVX512", torch.bfloat16, "avx512_bf16"),
    (AMX_XEON, "AVX512", torch.bfloat16, "avx512_bf16"),
    ({"amx_bf16": True}, "AVX512", torch.bfloat16, "amx_bf16"),
    (AVX2_EPYC, "AVX2", torch.float32, "no avx512_bf16 or amx_bf16"),
    ({"avx2": True, "avx512f": True}, "AVX512", torch.float32, "no avx512_bf16"),  # AVX-512 without bf16
    (AVX512_BF16_EPYC, "AVX2", torch.float32, "dispatches to AVX2"),  # ATEN_CPU_CAPABILITY=avx2
    ({}, "DEFAULT", torch.float32, "no avx512_bf16"),
])
def test_auto_on_cpu_follows_native_bf16(flags, capability, expected, word):
    for config_dtype in (None, torch.float32, torch.bfloat16, "float16"):  # the config does not decide on a CPU
        choice = choose_dtype("auto", config_dtype, CPU, flags=flags, capability=capability, machine="x86_64")
        assert choice.dtype == expected, (flags, capability, config_dtype)
        assert word in choice.reason and "auto on cpu" in choice.reason


def test_aarch64_and_flag_sets():
    assert native_bf16({"bf16", "asimd"}, None, "aarch64") == "bf16"
    assert native_bf16({"asimd"}, None, "aarch64") is None
    assert native_bf16({"avx512_bf16"}, "AVX512") == "avx512_bf16"


def test_auto_on_gpu_keeps_the_config_dtype():
    cuda = torch.device("cuda")
    assert choose_dtype("auto", torch.bfloat16, cuda).dtype == torch.bfloat16
    assert choose_dtype("auto", "float16", cuda).dtype == torch.float16
    choice = choose_dtype("auto", None, cuda)
    assert choice.dtype == torch.float32 and "names no dtype" in choice.reason


def test_explicit_dtype_is_honoured_except_fp16_on_cpu():
    assert choose_dtype("bfloat16", None, CPU, flags=AVX2_EPYC, capability="AVX2", machine="x86_64").dtype \
        == torch.bfloat16
    assert choose_dtype("float32", None, CPU, flags=AMX_XEON, capability="AVX512", machine="x86_64").reason \
        == "float32 was asked for"
    assert choose_dtype("float16", None, CPU).dtype == torch.float32
    assert choose_dtype("float16", None, torch.device("cuda")).dtype == torch.float16


def test_this_machine_decides_from_its_own_flags():
    from server.engines.vllm_kernels import cpu_info

    info = cpu_info()
    choice = choose_dtype("auto", None, CPU)
    native = native_bf16(info.get("flags") or {}, info.get("torch_capability"), info.get("machine") or "x86_64")
    assert choice.dtype == (torch.bfloat16 if native else torch.float32), choice.reason


def test_model_card_shows_the_dtype_and_why(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--served-model-name", "tiny-auto"])  # dtype: auto
    card = httpx.get(server.base_url + "/v1/models/tiny-auto", timeout=30).json()
    expected = choose_dtype("auto", None, CPU)
    assert card["dtype"] == expected.name and card["dtype_reason"] == expected.reason
    listed = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
    assert listed["tiny-auto"]["dtype"] == expected.name
