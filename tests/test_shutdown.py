"""Graceful shutdown with a real process and a real SIGTERM: in-flight streams finish, new work is
refused with 503, /ready turns 503, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.conftest import TINY, ServerProcess


def _start(tiny_model_dir, tmp_path, grace: float) -> ServerProcess:
    server = ServerProcess(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                            "--shutdown-grace", str(grace)], log_path=tmp_path / "server.log")
    server.wait_ready(120)
    return server


def _stream(server: ServerProcess, out: dict, started: threading.Event, max_tokens: int = 300) -> None:
    body = {"model": TINY, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    events = []
    try:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        started.set()
    out["events"] = events


def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_model_dir, tmp_path):
    server = _start(tiny_model_dir, tmp_path, grace=120)
    out: dict = {}
    started = threading.Event()
    # 1800 tokens (of its 2048 positions): the tiny model streams 300 in ~0.25 s on a quiet CPU, which
    # could end before the checks below ran (CI saw /ready refused: the drained server had exited)
    t = threading.Thread(target=_stream, args=(server, out, started, 1800))
    t.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{server.base_url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 2},
                         timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    t.join(150)
    assert "error" not in out, out.get("error")
    events = out["events"]
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]]
    assert finishes[-1] == "length"  # the whole stream, not a cut-off one
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 1800
    assert server.proc.wait(timeout=60) == 0
    assert "drained" in (tmp_path / "server.log").read_text()


def test_grace_period_bounds_the_wait(tiny_model_dir, tmp_path):
    server = _start(tiny_model_dir, tmp_path, grace=0.5)
    out: dict = {}
    started = threading.Event()
    # 2000 tokens outlast a 0.5 s grace even on a fast machine
    t = threading.Thread(target=_stream, args=(server, out, started, 2000))
    t.start()
    assert started.wait(60)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    t.join(30)
    assert "still running are cut off" in (tmp_path / "server.log").read_text()
