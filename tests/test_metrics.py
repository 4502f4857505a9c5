"""/metrics parses as Prometheus text and its counters move with traffic."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import TINY


def _samples(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base_url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_after_requests(server, client, engine):
    before = _samples(server.base_url)
    client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model=TINY, prompt="Hello", max_tokens=4, stream=True, temperature=0,
                                   extra_body={"ignore_eos": True}))
    httpx.post(server.base_url + "/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 9999})
    after = _samples(server.base_url)

    ok = dict(model=TINY, adapter="", status="200")
    assert _value(after, "slimserve_requests_total", **ok) - _value(before, "slimserve_requests_total", **ok) == 2
    assert _value(after, "slimserve_generation_tokens_total", model=TINY) - \
        _value(before, "slimserve_generation_tokens_total", model=TINY) == 9
    assert _value(after, "slimserve_prompt_tokens_total", model=TINY) > \
        _value(before, "slimserve_prompt_tokens_total", model=TINY)
    for hist in ("slimserve_time_to_first_token_seconds", "slimserve_e2e_request_latency_seconds",
                 "slimserve_request_queue_time_seconds"):
        assert _value(after, hist + "_count", model=TINY) - _value(before, hist + "_count", model=TINY) == 2
    gaps = _value(after, "slimserve_inter_token_latency_seconds_count", model=TINY) - \
        _value(before, "slimserve_inter_token_latency_seconds_count", model=TINY)
    # one gap per output: vLLM may hand over two tokens in one output when the machine is busy
    assert gaps == 7 if engine == "torch" else 5 <= gaps <= 7
    assert _value(after, "slimserve_process_resident_memory_bytes") > 10_000_000
    assert _value(after, "slimserve_model_weight_bytes", model=TINY) > 0
    assert ("slimserve_num_requests_running", (("model", TINY),)) in after
    assert ("slimserve_num_requests_waiting", (("model", TINY),)) in after


def test_health_and_ready(server):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.base_url + "/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_refused_requests_count_by_status(server):
    """400 (bad field), 404 (unknown model) and 413 (body too large) never reach an engine; they count too."""
    before = _samples(server.base_url)
    url = server.base_url + "/v1/chat/completions"
    assert httpx.post(url, json={"model": TINY, "messages": [], "max_tokens": 1}).status_code == 400
    assert httpx.post(url, json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
                      ).status_code == 404
    assert httpx.post(server.base_url + "/v1/completions", content=b"x" * (5 << 20),
                      headers={"content-type": "application/json"}).status_code == 413
    after = _samples(server.base_url)

    def moved(**labels) -> float:
        return _value(after, "slimserve_requests_total", **labels) - _value(before, "slimserve_requests_total",
                                                                            **labels)

    assert moved(model=TINY, adapter="", status="400") == 1
    assert moved(model="", adapter="", status="404") == 1  # an unknown name mints no label value
    assert moved(model="", adapter="", status="413") == 1


def test_kv_cache_bytes_while_a_request_streams(server, client):
    """slimserve_kv_cache_bytes{model} is the memory the cached tokens hold: above zero mid-stream. The
    request asks for far more tokens than are read (a 120-token one could finish on the server before the
    client read its 40th chunk, the KV already freed), and closing the stream then aborts it."""
    stream = client.completions.create(model=TINY, prompt="Hello there, how are you", max_tokens=1500,
                                       stream=True, temperature=0, extra_body={"ignore_eos": True})
    seen = []
    for i, _ in enumerate(stream):
        if i in (5, 40):
            s = _samples(server.base_url)
            seen.append((_value(s, "slimserve_kv_cache_bytes", model=TINY),
                         _value(s, "slimserve_kv_cache_tokens", model=TINY)))
        if i == 40:
            break
    stream.close()
    assert seen and all(nbytes > 0 for nbytes, _ in seen), seen
    assert all(tokens > 0 for _, tokens in seen), seen


def test_gpu_memory_series_absent_without_a_gpu(server):
    """On a machine without GPUs the series does not exist at all (a dashboard must not read 0 bytes
    of GPU memory as 'empty GPU')."""
    import torch

    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has a GPU: the series is expected here")
    assert "slimserve_gpu_memory_bytes" not in httpx.get(server.base_url + "/metrics").text


def test_gpu_memory_gauge_from_readings():
    """The gauge appears at the first non-empty reading, one series per device and kind."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.gpu_memory import GpuMemory

    readings: dict = {}
    registry = CollectorRegistry()
    gpu = GpuMemory(registry, read=lambda: readings)
    gpu.refresh()
    assert b"slimserve_gpu_memory_bytes" not in generate_latest(registry)
    readings.update({"cuda:0": {"total": 80 << 30, "used": 9 << 30, "reserved": 6 << 30, "allocated": 5 << 30}})
    gpu.refresh()
    samples = {(s.labels["device"], s.labels["kind"]): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples == {("cuda:0", "total"): 80 << 30, ("cuda:0", "used"): 9 << 30,
                       ("cuda:0", "reserved"): 6 << 30, ("cuda:0", "allocated"): 5 << 30}
