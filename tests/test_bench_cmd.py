"""`slimserve bench` as a real subprocess against a real `slimserve serve` of the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY
from server.bench.prompts import synthetic_prompts
from server.bench.report import percentile


@pytest.fixture(scope="module")
def tiny_server(start_server, tiny_model_dir):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32"])


def bench(server, tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "server", "bench", "--base-url", server.base_url, "--out", str(out),
                           "--no-progress", *flags], capture_output=True, text=True, timeout=120)
    assert out.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_two_levels_streamed(tiny_server, tmp_path):
    proc, report = bench(tiny_server, tmp_path, "--model", TINY, "--concurrency", "1,4", "--num-prompts", "8",
                         "--input-len", "12", "--max-tokens", "8", "--stream", "--ignore-eos", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "| concurrency |" in proc.stdout
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert (lv["requests"], lv["completed"], lv["errors"], lv["missing_usage"]) == (8, 8, 0, 0)
        assert lv["output_tokens"] == 8 * 8 and lv["mean_output_tokens"] == 8  # ignore_eos: exactly max_tokens
        assert lv["input_tokens"] > 8 * 12 / 2
        assert lv["output_tok_per_s"] == pytest.approx(lv["output_tokens"] / lv["duration_s"], rel=0.01)
        assert lv["req_per_s"] == pytest.approx(8 / lv["duration_s"], rel=0.01)
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            d = lv[key]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
        assert lv["ttft_ms"]["p50"] <= lv["e2e_ms"]["p50"]
        assert lv["e2e_ms"]["p99"] / 1000 <= lv["duration_s"] + 0.01
    assert report["config"]["prompts"] == "synthetic(seed=3)"


def test_wrong_model_counts_errors(tiny_server, tmp_path):
    proc, report = bench(tiny_server, tmp_path, "--model", "no-such-model", "--concurrency", "2",
                         "--num-prompts", "4", "--max-tokens", "4", "--stream")
    assert proc.returncode == 1
    (lv,) = report["levels"]
    assert (lv["requests"], lv["completed"], lv["errors"], lv["output_tokens"]) == (4, 0, 4, 0)
    assert lv["error_messages"] and lv["error_messages"][0].startswith("HTTP 404")
    assert lv["ttft_ms"] is None and lv["output_tok_per_s"] == 0


def test_chat_not_streamed_from_prompts_file(tiny_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    proc, report = bench(tiny_server, tmp_path, "--model", TINY, "--chat", "--prompts", str(prompts),
                         "--concurrency", "2", "--num-prompts", "3", "--max-tokens", "5", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    (lv,) = report["levels"]
    assert (lv["completed"], lv["errors"], lv["output_tokens"]) == (3, 0, 15)
    assert lv["ttft_ms"] is None and lv["e2e_ms"]["p50"] > 0  # no stream, no TTFT


def test_prompts_and_percentiles():
    assert synthetic_prompts(5, 40, seed=1) == synthetic_prompts(5, 40, seed=1)
    assert synthetic_prompts(5, 40, seed=1) != synthetic_prompts(5, 40, seed=2)
    assert all(35 <= len(p.split()) <= 40 for p in synthetic_prompts(5, 40))
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5


def test_extra_body_and_tokens_from_chunks():
    """A server that streams no usage (llama-cpp-python's) and knows no ignore_eos: `extra_body` reaches
    every request, and with `tokens_from_chunks` its content chunks count as its output tokens."""
    import asyncio

    import httpx

    from server.bench.loadgen import BenchConfig, run_level

    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        chunks = [{"choices": [{"delta": {"content": w}}]} for w in ("a", "b", "", "c")]
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    async def level(count: bool) -> dict:
        cfg = BenchConfig(base_url="http://fake", model="m", chat=True, progress=False, warmup=0,
                          extra_body={"logit_bias": {"2": -100}}, tokens_from_chunks=count)
        async with httpx.AsyncClient(base_url=cfg.base_url, transport=httpx.MockTransport(handler)) as client:
            return await run_level(client, cfg, ["hi", "there"], 2)

    counted, plain = asyncio.run(level(True)), asyncio.run(level(False))
    assert all(b["logit_bias"] == {"2": -100} and b["stream"] for b in bodies)
    assert (counted["output_tokens"], counted["missing_usage"], counted["errors"]) == (6, 0, 0)
    assert (plain["output_tokens"], plain["missing_usage"]) == (0, 2)
