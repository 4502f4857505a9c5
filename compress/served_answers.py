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
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

_RETRIES = 3  # tries for a request the server could not take now (429, 503) or a dropped connection
_BUSY = (429, 503)


class ServedAnswerError(RuntimeError):
    pass


def served_answers(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int = 8,
                   api_key: str | None = None, timeout: float = 300.0, desc: str = "answers",
                   progress: bool = True) -> list:
    """Each prompt as one user turn to `{base_url}/chat/completions` (temperature 0, logprobs), in order,
    as router_calibration.Answer; `concurrency` requests in flight, so a batching server answers them
    together. A request the server refuses, or an answer without usage or logprobs, raises
    ServedAnswerError with the reason."""
    from tqdm import tqdm

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"
    with httpx.Client(timeout=timeout, headers=headers) as client, ThreadPoolExecutor(max(1, concurrency)) as pool:
        asked = pool.map(lambda p: _ask(client, url, model, p, max_tokens), prompts)
        return list(tqdm(asked, total=len(prompts), desc=f"{desc} ({model} at {base_url})", disable=not progress))


def _post(client: httpx.Client, url: str, body: dict) -> httpx.Response:
    """The response; a busy server (429/503, honouring Retry-After up to 30 s) or a dropped connection is
    tried again, a timeout is not (the server is working, only slowly)."""
    for attempt in range(_RETRIES):
        last = attempt == _RETRIES - 1
        try:
            r = client.post(url, json=body)
        except httpx.TimeoutException as exc:
            raise ServedAnswerError(f"{url}: no answer within the timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            if last:
                raise ServedAnswerError(f"{url}: {type(exc).__name__}: {exc}") from exc
            wait = 2.0 ** attempt
        except httpx.HTTPError as exc:
            raise ServedAnswerError(f"{url}: {type(exc).__name__}: {exc}") from exc
        else:
            if r.status_code not in _BUSY or last:
                return r
            try:
                wait = min(30.0, float(r.headers.get("retry-after", 2.0 ** attempt)))
            except ValueError:
                wait = 2.0 ** attempt
        time.sleep(wait)
    raise AssertionError("unreachable")


def _ask(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int):
    from compress.router_calibration import Answer

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "logprobs": True}
    r = _post(client, url, body)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise ServedAnswerError(f"{url} answered {r.status_code} for model {model!r}: {message}")
    try:
        data = r.json()
        choice = data["choices"][0]
        text = (choice["message"].get("content") or "").strip()
        tokens = int(data["usage"]["completion_tokens"])
        content = (choice.get("logprobs") or {}).get("content") or []
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ServedAnswerError(f"{url} gave an answer for model {model!r} that is not a chat completion with "
                                f"usage: {type(exc).__name__}: {exc}") from exc
    logprobs = [t["logprob"] for t in content if t.get("logprob") is not None and math.isfinite(t["logprob"])]
    if tokens and not logprobs:  # a cascade reads them: without, its curve would be flat, silently
        raise ServedAnswerError(f"{url} gave no logprobs for model {model!r} (asked with logprobs: true)")
    return Answer(text, sum(logprobs) / len(logprobs) if logprobs else 0.0, min(logprobs, default=0.0), tokens)


def api_key_from(env_name: str | None) -> str | None:
    """The key named by `--api-key-env` (never given on the command line itself)."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ServedAnswerError(f"--api-key-env names {env_name}, which is not set")
    return key
