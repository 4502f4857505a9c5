"""An asynchronous load generator for any OpenAI-compatible server (slimserve, vLLM, others).

Per concurrency level, `num_prompts` requests are sent with at most `concurrency` in flight (like
`vllm bench serve --max-concurrency`). Streamed responses give time to first token and the gaps
between text chunks (inter-token latency, per chunk as vLLM's benchmark measures it); token counts
come from the server's `usage` (`stream_options.include_usage` when streaming); for a server that
streams no usage (llama-cpp-python's), `tokens_from_chunks` counts its content chunks instead, one
per token there. `extra_body` adds fields to every request (as the OpenAI client's `extra_body`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from server.bench.report import RequestResult, summarise


@dataclass
class BenchConfig:
    base_url: str
    model: str
    adapters: list[str] = field(default_factory=list)  # when set, request i asks for adapters[i % len]
    concurrency: list[int] = field(default_factory=lambda: [1])
    num_prompts: int = 16
    max_tokens: int = 128
    stream: bool = True
    chat: bool = False
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False  # vLLM's extension (slimserve has it too): every request runs to max_tokens
    timeout_s: float = 600.0
    warmup: int = 1
    progress: bool = True
    extra_body: dict = field(default_factory=dict)  # e.g. a logit_bias where a server lacks ignore_eos
    tokens_from_chunks: bool = False  # no streamed usage: output tokens = content chunks (one per token)

    def model_for(self, i: int) -> str:
        return self.adapters[i % len(self.adapters)] if self.adapters else self.model


def _payload(cfg: BenchConfig, model: str, prompt: str | list[dict]) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "stream": cfg.stream}
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    if cfg.chat:
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
    return "/v1/completions", body


def _error_text(status: int, raw: bytes) -> str:
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")[:300]
    return f"HTTP {status}: {message}"


def _chunk_text(choice: dict) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or ""
    return choice.get("text") or ""


def _take_usage(result: RequestResult, usage: dict | None) -> None:
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.output_tokens = usage.get("completion_tokens")


async def one_request(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt) -> RequestResult:
    path, body = _payload(cfg, model, prompt)
    result = RequestResult(model=model)
    start = time.perf_counter()
    try:
        if not cfg.stream:
            resp = await client.post(path, json=body)
            if resp.status_code != 200:
                result.error = _error_text(resp.status_code, resp.content)
            else:
                _take_usage(result, resp.json().get("usage"))
                result.ok = True
        else:
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    result.error = _error_text(resp.status_code, await resp.aread())
                else:
                    await _read_stream(resp, result, start, cfg.tokens_from_chunks)
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.e2e = time.perf_counter() - start
    if result.error:
        result.ok = False
    return result


async def _read_stream(resp: httpx.Response, result: RequestResult, start: float, count_chunks: bool = False) -> None:
    last, chunks = None, 0
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:  # errors after the headers arrive in-band
            err = obj["error"]
            result.error = "in-stream: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
            return
        now = time.perf_counter()
        if any(_chunk_text(c) for c in obj.get("choices") or []):
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            chunks += 1
        _take_usage(result, obj.get("usage"))
    if count_chunks and result.output_tokens is None:
        result.output_tokens = chunks
    result.ok = True


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    top = max(cfg.concurrency)
    return httpx.AsyncClient(base_url=cfg.base_url.rstrip("/").removesuffix("/v1"), headers=headers,
                             timeout=httpx.Timeout(cfg.timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=top + 4, max_keepalive_connections=top + 4))


async def run_level(client: httpx.AsyncClient, cfg: BenchConfig, prompts: list, concurrency: int) -> dict:
    """Send every prompt with at most `concurrency` in flight; the figures of the level."""
    from tqdm import tqdm

    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req", disable=not cfg.progress,
               leave=False)

    async def gated(i: int, prompt) -> RequestResult:
        async with gate:
            r = await one_request(client, cfg, cfg.model_for(i), prompt)
        bar.update(1)
        return r

    start = time.perf_counter()
    results = await asyncio.gather(*[gated(i, p) for i, p in enumerate(prompts)])
    duration = time.perf_counter() - start
    bar.close()
    level = summarise(list(results), concurrency, duration)
    level["models"] = sorted({r.model for r in results})
    return level


async def run_bench(cfg: BenchConfig, prompts: list) -> dict:
    """Warm up, then one level per concurrency value, all on the same prompts in the same order."""
    async with make_client(cfg) as client:
        if cfg.warmup:
            await asyncio.gather(*[one_request(client, cfg, cfg.model_for(i), prompts[i % len(prompts)])
                                   for i in range(cfg.warmup)])
        levels = [await run_level(client, cfg, prompts, c) for c in cfg.concurrency]
    return {"levels": levels}
