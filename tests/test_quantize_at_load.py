"""`serve --quantization gptq|awq|rtn` on a full-precision model: progress while it quantizes, the
same artifact as `compress quantize` with the same recipe, the shared cache (hit, two servers at
once, an interrupted run) and every refusal before any work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from compress.quant_cache import entries, ensure, is_complete
from compress.quantize import QuantizeSpec
from conftest import ServerProcess
from server.errors import ConfigError
from server.quantize_at_load import check, spec_for
from server.settings import load_settings

SAMPLES = 4


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _cached(cache: Path) -> list[dict]:
    return [e for e in entries(cache) if e["complete"]]


def _watch_until_ready(server: ServerProcess, timeout: float = 300) -> list[tuple[int, int, dict]]:
    """(health status, ready status, ready body) until /ready is 200."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}: {server.log_text()}")
        try:
            health = httpx.get(server.base_url + "/health", timeout=5).status_code
            r = httpx.get(server.base_url + "/ready", timeout=5)
            seen.append((health, r.status_code, r.json()))
            if r.status_code == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(server.log_text())


def test_gptq_at_load_says_what_it_does_serves_and_equals_the_offline_artifact(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tq", "--dtype", "float32", "--quantization",
            "gptq", "--calib", "self", "--calib-samples", str(SAMPLES), "--quant-group-size", "64",
            "--cache-dir", str(cache)]
    first = ServerProcess(args, log_path=tmp_path / "first.log")
    try:
        seen = _watch_until_ready(first)
        loading = [body["loading"]["tq"] for health, status, body in seen if status == 503 and "loading" in body]
        assert loading, "no 503 /ready with a loading body was seen"
        assert all(health == 200 for health, _, _ in seen), "/health must stay 200 while the model quantizes"
        stages = {row["stage"] for row in loading}
        assert stages & {"calibrating", "quantizing", "hashing the weights for the cache key"}, stages
        card = httpx.get(first.base_url + "/v1/models").json()["data"][0]
        assert "gptq" in str(card["quantization"])
        r = httpx.post(first.base_url + "/v1/completions", json={"model": "tq", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        metrics = httpx.get(first.base_url + "/metrics").text
        assert 'slimserve_model_load_progress{model="tq",stage="ready"} 1.0' in metrics
    finally:
        first.stop()
    [artifact] = _cached(cache)
    assert "quantized into" in first.log_text()

    # the same recipe offline, as a user would run it: byte-identical weights
    offline = tmp_path / "offline"
    done = subprocess.run([sys.executable, "-m", "server", "compress", "quantize", str(tiny_model_dir), str(offline),
                           "--method", "gptq", "--calib", "self", "--num-samples", str(SAMPLES), "--seq-len", "256",
                           "--group-size", "64"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _weights(offline) == _weights(Path(artifact["path"]))
    manifest = json.loads((Path(artifact["path"]) / "slimserve.json").read_text())
    assert manifest["calibration"] == "self" and manifest["cache_identity"]["calibration"].startswith("self-v")

    # the second start reuses the cache
    second = ServerProcess(args, log_path=tmp_path / "second.log")
    try:
        started = time.monotonic()
        second.wait_ready(120)
        print(f"second start ready in {time.monotonic() - started:.1f} s")
        assert "reusing the cached" in second.log_text()
    finally:
        second.stop()
    assert len(_cached(cache)) == 1


def test_gptq_at_load_on_the_vllm_engine_serves_the_artifact_folder(tiny_model_dir, tmp_path):
    """vLLM is handed the cached artifact's folder: it serves the GPTQ weights slimserve made at start
    (its card and vLLM's own config say gptq), and the PyTorch engine then reuses the same entry."""
    pytest.importorskip("vllm")
    from conftest import engine_flags
    from server.engines.vllm_kernels import missing_for

    missing = missing_for(None, {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64,
                                                         "sym": True}})
    if missing:
        pytest.skip(missing)
    cache = tmp_path / "cache"
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tq", "--dtype", "bfloat16", "--quantization", "gptq",
            "--calib", "self", "--calib-samples", str(SAMPLES), "--quant-group-size", "64", "--cache-dir", str(cache)]
    body = {"model": "tq", "prompt": "Hello, world!", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    texts = {}
    for engine in ("vllm", "torch"):  # vLLM first: it quantizes, the PyTorch engine then reuses the artifact
        server = ServerProcess(args + engine_flags(engine), log_path=tmp_path / f"{engine}.log")
        try:
            server.wait_ready(600)
            card = httpx.get(server.base_url + "/v1/models").json()["data"][0]
            assert "gptq" in str(card["quantization"]), card
            r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            texts[engine] = r.json()["choices"][0]["text"]
            again = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
            assert again.json()["choices"][0]["text"] == texts[engine]  # greedy replays
        finally:
            server.stop()
    assert "quantized into" in (tmp_path / "vllm.log").read_text()
    assert "reusing the cached" in (tmp_path / "torch.log").read_text()
    assert len(_cached(cache)) == 1
    assert "quantization=auto_gptq" in (tmp_path / "vllm.log").read_text()  # vLLM's own engine config


def test_two_servers_starting_together_quantize_once(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tq", "--dtype", "float32",
            "--quantization", "rtn", "--quant-group-size", "64", "--cache-dir", str(cache)]
    servers = [ServerProcess(args, log_path=tmp_path / f"s{i}.log") for i in range(2)]
    try:
        for s in servers:
            s.wait_ready(300)
        logs = [s.log_text() for s in servers]
    finally:
        for s in servers:
            s.stop()
    assert sum("quantized into" in log for log in logs) == 1, logs
    assert sum("reusing the cached" in log for log in logs) == 1, logs
    assert len(_cached(cache)) == 1 and len(entries(cache)) == 1


KILL_WHILE_QUANTIZING = """
import os, signal, sys
from pathlib import Path
from compress.quant_cache import ensure
from compress.quantize import QuantizeSpec

def progress(stage, done, total):
    if stage == "quantizing" and done >= 1:
        os.kill(os.getpid(), signal.SIGKILL)

spec = QuantizeSpec(model=Path(sys.argv[1]), out=Path("/unused"), method="gptq", group_size=64, calib="self",
                    num_samples=2, seq_len=32)
ensure(spec, Path(sys.argv[2]), progress)
"""


def test_an_interrupted_run_is_never_taken_for_an_artifact(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_QUANTIZING, str(tiny_model_dir), str(cache)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _cached(cache) == []
    spec = QuantizeSpec(model=tiny_model_dir, out=Path("/unused"), method="gptq", group_size=64, calib="self",
                        num_samples=2, seq_len=32)
    # what a crash during the final copy could leave: a half-written partial and a folder without its manifest
    from compress.quant_cache import key_for

    name = key_for(spec).name
    (cache / "quantized" / f".{name}.partial").mkdir(parents=True)
    (cache / "quantized" / name).mkdir()
    (cache / "quantized" / name / "model.safetensors").write_bytes(b"truncated")
    folder, made = ensure(spec, cache)  # the dead process's lock is gone: this does not wait
    assert made and is_complete(folder)
    assert not (cache / "quantized" / f".{name}.partial").exists()
    assert [e["name"] for e in entries(cache)] == [name]


def _settings(model: Path, cache: Path, **kw):
    return load_settings(None, model=str(model), cache_dir=cache, **kw)


@pytest.mark.parametrize("change, setting, message", [
    ({"quant_group_size": 48}, "quantization", "does not divide"),
    ({"calib": "/no/such/calibration.txt"}, "quantization", "calibration.txt"),
    ({"quant_bits": 5}, "quantization", "bits must be"),
    ({"engine": "vllm", "dtype": "float32"}, "dtype", "float16 or bfloat16"),
])
def test_bad_recipes_are_refused_before_any_work(tiny_model_dir, tmp_path, change, setting, message):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        check(_settings(tiny_model_dir, cache, quantization="gptq", **change), str(tiny_model_dir), lora=False)
    assert err.value.setting == setting and message in str(err.value)
    assert not (cache / "quantized").exists()


def test_an_already_quantized_model_and_an_unwritable_cache_are_refused(tiny_model_dir, tmp_path):
    quantized = tmp_path / "already"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ConfigError, match=r"already quantized \(awq\)"):
        check(_settings(quantized, tmp_path, quantization="gptq"), str(quantized), lora=False)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        check(_settings(tiny_model_dir, blocked, quantization="rtn"), str(tiny_model_dir), lora=False)
    assert err.value.setting == "cache_dir"


def test_a_method_vllm_cannot_serve_here_is_refused_with_the_probe_reason(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from server.engines.vllm_kernels import missing_for

    settings = _settings(tiny_model_dir, tmp_path, quantization="gptq", engine="vllm")
    spec = spec_for(settings, str(tiny_model_dir))
    missing = missing_for(None, {"quantization_config": {"quant_method": "gptq", "bits": 4,
                                                         "group_size": spec.group_size, "sym": True}})
    if missing is None:  # this CPU has vLLM's 4-bit kernel: the recipe is accepted
        assert check(settings, str(tiny_model_dir), lora=False).method == "gptq"
        return
    with pytest.raises(ConfigError, match="would be made but not served"):
        check(settings, str(tiny_model_dir), lora=False)


def test_serve_exits_2_on_a_refused_recipe_without_quantizing(tiny_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "server", "serve", "--model", str(tiny_model_dir), "--port", "0",
                           "--quantization", "awq", "--quant-bits", "8", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "AWQ checkpoints are 4-bit" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "quantized").exists()


def test_warm_fills_the_cache_from_a_config_and_cache_lists_and_removes(tiny_model_dir, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\nmodels:\n"
                      f"  - name: small\n    model: {tiny_model_dir}\n"
                      f"    quantization: {{method: rtn, bits: 8, group_size: 32}}\n"
                      f"  - name: full\n    model: {tiny_model_dir}\n")
    cli = [sys.executable, "-m", "server", "compress"]
    warm = subprocess.run([*cli, "warm", "--config", str(config)], capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    [row] = entries(tmp_path / "cache")
    assert row["complete"] and row["bits"] == 8 and "-rtn8-g32-" in row["name"]
    listed = subprocess.run([*cli, "cache", "ls", "--json", "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=120)
    assert json.loads(listed.stdout)[0]["name"] == row["name"]
    removed = subprocess.run([*cli, "cache", "rm", row["name"], "--cache-dir", str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=120)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert entries(tmp_path / "cache") == []
