"""The anchors bench (`python -m tests.bench.anchors`): it skips llama.cpp, saying why, without its
venv, and it judges issue #19's targets best dtype against best dtype."""

from __future__ import annotations

from pathlib import Path

from bench import anchors


def _level(tok: float, ttft: float, tpot: float) -> dict:
    return {"output_tok_per_s": tok, "ttft_ms": {"p50": ttft}, "tpot_ms": {"p50": tpot}, "mean_output_tokens": 128,
            "errors": 0}


def test_llamacpp_skipped_with_reason_when_its_venv_is_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(anchors, "LLAMACPP_PY", tmp_path / "none" / "bin" / "python")
    servers, skipped = anchors.start(["llamacpp_q4_1"], Path("unused"), 2)
    assert servers == {} and "setup_llamacpp.sh" in skipped["llamacpp_q4_1"]


def test_targets_take_each_side_at_its_best_dtype():
    runs = {"raw_vllm_bf16": (20, 300, 250), "raw_vllm_fp32": (25, 250, 260),
            "slimserve_torch_bf16": (35, 240, 400), "slimserve_torch_fp32": (30, 230, 300),
            "slimserve_torch_int4": (40, 200, 500), "slimserve_torch_int8": (50, 210, 450),
            "llamacpp_q4_1": (55, 100, 5000)}
    systems = {k: anchors.row({1: [_level(c1, 50, 1000 / (c1 + 1))], 16: [_level(c16, t16, 0)]}, bound=60.0)
               for k, (c1, c16, t16) in runs.items()}
    t = anchors.targets(systems)
    c16 = t["slimserve torch c16 >= 1.2x raw vLLM"]
    assert c16["slimserve"] == ["slimserve_torch_bf16", 240] and c16["raw_vllm"] == ["raw_vllm_bf16", 300]
    assert c16["ratio"] == 0.8 and not c16["met"]
    assert t["slimserve torch c1 >= 1.3x raw vLLM"]["ratio"] == 1.4  # int4 and int8 are not dtypes: 35 / 25
    assert t["slimserve_torch_int8 batch-1 >= 1.3x slimserve_torch_bf16"] == {"ratio": round(50 / 35, 3), "met": True}
    assert t["slimserve_torch_int4 batch-1 >= 1.6x slimserve_torch_bf16"] == {"ratio": round(40 / 35, 3), "met": False}
    ttft = t["TTFT p50 c16 <= raw vLLM's"]
    assert ttft["slimserve"] == ["slimserve_torch_fp32", 300] and ttft["raw_vllm"][1] == 250 and not ttft["met"]
    assert t["slimserve_torch_int4 batch-1 decode >= 0.5 of bandwidth bound"]["fraction"] == round(41 / 60, 3)
    assert t["slimserve_torch_int4 batch-1 within 1.5x of llama.cpp Q4_1"] == {"llamacpp_over_slimserve": 1.375,
                                                                              "met": True}
