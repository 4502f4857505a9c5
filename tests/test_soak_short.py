"""A short soak in the suite: concurrent streaming clients on the tiny model, some leaving mid-stream.
No accepted request may fail, every disconnect must stop its generation (the engine's aborted counter
grows by exactly that many), and nothing may be left running. The 5-minute SmolLM2 run is
`python -m tests.bench.soak`."""

from __future__ import annotations

from conftest import TINY
from bench.soak import soak


def test_short_soak(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                           "--max-num-seqs", "8"])
    result = soak(server.base_url, TINY, clients=16, duration=15, warmup=5, rss_window=5, disconnect_every=4,
                  max_tokens=24, max_rss_growth=0.25)
    assert result["requests_ok"] > 16 and result["disconnected_on_purpose"] > 4, result
    checks = result["checks"]
    assert checks["no_failed_accepted_requests"], result["failure_examples"]
    assert checks["disconnects_stopped_generation"], result
    assert checks["nothing_left_running"], result
    assert checks["rss_growth_below_limit"], result  # loose on 20 s; the long soak holds it to 5%
    assert result["ttft_s"]["p50"] is not None and result["e2e_s"]["p99"] >= result["e2e_s"]["p50"]
