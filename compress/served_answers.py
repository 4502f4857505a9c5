"""Greedy answers from a model as it is served: any OpenAI-compatible server (slimserve, vLLM ...).

A variant quantized at load is served on the engine's own kernels (slimserve's int8/int4 on CPUs,
vLLM's on GPUs), which round differently from the transformers path `compress.greedy` loads. A router
calibrated on answers from the served models agrees with what the server will really return, and a
server that batches answers far faster than generating them offline here. compress imports nothing
from server: this talks HTTP only.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


class ServedAnswerError(RuntimeError):
    pass


@dataclass
class ServedAnswer:
    text: str
    mean_logprob: float  # over the tokens the server reported logprobs for
    min_logprob: float
    tokens: int  # usage.completion_tokens


def served_answers(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int = 8,
                   api_key: str | None = None, timeout: float = 300.0, desc: str = "answers",
                   progress: bool = True) -> list[ServedAnswer]:
    """Each prompt as one user turn to `{base_url}/chat/completions` (temperature 0, logprobs), in order;
    `concurrency` requests in flight, so a batching server answers them together. A request the server
    refuses raises ServedAnswerError with its error message."""
    from tqdm import tqdm

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"
    with httpx.Client(timeout=timeout, headers=headers) as client, ThreadPoolExecutor(max(1, concurrency)) as pool:
        asked = pool.map(lambda p: _ask(client, url, model, p, max_tokens), prompts)
        return list(tqdm(asked, total=len(prompts), desc=f"{desc} ({model} at {base_url})", disable=not progress))


def _ask(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> ServedAnswer:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "logprobs": True}
    try:
        r = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise ServedAnswerError(f"{url}: {type(exc).__name__}: {exc}") from exc
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise ServedAnswerError(f"{url} answered {r.status_code} for model {model!r}: {message}")
    data = r.json()
    choice = data["choices"][0]
    logprobs = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])
                if t.get("logprob") is not None and math.isfinite(t["logprob"])]
    tokens = (data.get("usage") or {}).get("completion_tokens")
    if tokens is None:
        raise ServedAnswerError(f"{url} gave no usage.completion_tokens for model {model!r}")
    return ServedAnswer((choice["message"].get("content") or "").strip(),
                        sum(logprobs) / len(logprobs) if logprobs else 0.0, min(logprobs, default=0.0), int(tokens))


def api_key_from(env_name: str | None) -> str | None:
    """The key named by `--api-key-env` (never given on the command line itself)."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ServedAnswerError(f"--api-key-env names {env_name}, which is not set")
    return key
