"""`slimserve env`: the bug-report facts, as JSON and as text."""

from __future__ import annotations

import json
import subprocess
import sys

from server.cli import main


def test_env_json_has_what_a_bug_report_needs(tmp_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "weights.bin").write_bytes(b"x" * 1000)
    (cache / "a.txt").write_bytes(b"y" * 24)
    out = subprocess.run([sys.executable, "-m", "server", "env", "--json", "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    assert {"slimserve", "python", "platform", "cpu", "torch", "gpus", "dtype_auto", "packages", "vllm",
            "cache"} <= set(report)
    from server.engines.torch.dtype_choice import choose_dtype  # what `dtype: auto` picks here, and why

    import torch

    auto = choose_dtype("auto", None, torch.device("cpu"))
    assert report["dtype_auto"]["cpu"] == {"dtype": auto.name, "reason": auto.reason}
    from server import __version__

    assert report["slimserve"] == __version__
    assert report["python"]["version"].count(".") == 2
    assert report["torch"]["version"] and report["torch"]["build"] and report["torch"]["threads"] >= 1
    assert report["torch"]["cpu_capability"]
    assert isinstance(report["gpus"], list)
    assert {"transformers", "peft", "vllm", "gptqmodel", "torchao", "bitsandbytes"} <= set(report["packages"])
    assert report["packages"]["transformers"]
    assert report["cpu"]["cores"] >= 1 and "model" in report["cpu"]
    if report["cpu"]["flags"]:  # x86 Linux: the flags of interest, each True or False
        assert {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"} <= set(report["cpu"]["flags"])
    if report["vllm"] is not None:
        assert report["vllm"]["version"] and report["vllm"]["platform"]
        if report["vllm"]["platform"] == "cpu":
            assert "cpu_gemm_wna16" in report["vllm"]["ops"] and "gptq-4bit" in report["vllm"]["serves"]
    assert report["cache"] == {"dir": str(cache), "exists": True, "bytes": 1024}
    from server.engines.torch import int8_gemv  # load-time int8's decode kernel: built here, or why not

    kernel = report["int8_decode_kernel"]
    assert kernel["runs"] == int8_gemv.available() and (kernel["why"] is None) == kernel["runs"]
    from server.engines.torch import decode_attention  # the compiled step's attention kernel: the same

    attention = report["decode_attention_kernel"]
    assert attention["runs"] == (decode_attention.off_reason() is None) and attention["why"] == \
        decode_attention.off_reason()


def test_env_text(tmp_path, capsys):
    assert main(["env", "--cache-dir", str(tmp_path / "absent")]) == 0
    text = capsys.readouterr().out
    for title in ("system", "cpu", "torch", "gpus", "dtype auto (torch engine)", "packages", "vllm", "cache"):
        assert f"\n{title}\n" in text
    assert "(does not exist)" in text
