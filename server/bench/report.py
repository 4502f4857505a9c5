"""Turn per-request measurements into per-level figures, and figures into a Markdown table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

QUANTILES = (50, 90, 99)
MAX_ERROR_MESSAGES = 5


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds from the request's start; token counts
    are the server's `usage` (None when the server sent none)."""

    model: str
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution_ms(values: list[float]) -> dict | None:
    if not values:
        return None
    out = {f"p{q}": round(percentile(values, q) * 1000, 2) for q in QUANTILES}
    out["mean"] = round(sum(values) / len(values) * 1000, 2)
    return out


def summarise(results: list[RequestResult], concurrency: int, duration_s: float) -> dict:
    """The figures of one concurrency level."""
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    messages: list[str] = []
    for r in errors:
        if r.error and r.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
            messages.append(r.error)
    with_usage = [r for r in ok if r.output_tokens is not None]
    out_tokens = sum(r.output_tokens for r in with_usage)
    in_tokens = sum(r.prompt_tokens or 0 for r in with_usage)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in with_usage
            if r.ttft is not None and r.output_tokens and r.output_tokens > 1]
    duration_s = max(duration_s, 1e-9)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_messages": messages,
        "missing_usage": len(ok) - len(with_usage),
        "duration_s": round(duration_s, 3),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "mean_input_tokens": round(in_tokens / len(with_usage), 1) if with_usage else None,
        "mean_output_tokens": round(out_tokens / len(with_usage), 1) if with_usage else None,
        "req_per_s": round(len(ok) / duration_s, 3),
        "output_tok_per_s": round(out_tokens / duration_s, 2),
        "total_tok_per_s": round((in_tokens + out_tokens) / duration_s, 2),
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl]),
        "tpot_ms": distribution_ms(tpot),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
    }


def _fmt(d: dict | None, q: str) -> str:
    return "" if d is None else f"{d[q]:.1f}"


def markdown_table(levels: list[dict]) -> str:
    head = ("| concurrency | ok / sent | errors | output tok/s | req/s | TTFT p50 / p90 / p99 ms "
            "| ITL p50 / p90 / p99 ms | e2e p50 / p90 / p99 ms |")
    rows = [head, "|" + "---|" * 8]
    for lv in levels:
        cells = [str(lv["concurrency"]), f"{lv['completed']} / {lv['requests']}", str(lv["errors"]),
                 f"{lv['output_tok_per_s']:.1f}", f"{lv['req_per_s']:.2f}"]
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            d = lv[key]
            cells.append(" / ".join(_fmt(d, f"p{q}") for q in QUANTILES) if d else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
