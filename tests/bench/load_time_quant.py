"""Load-time GPTQ, measured: a first start that quantizes (time to ready, split by the stages /ready
reports) against a second start from the cache, and two servers started together on one empty cache
folder (one quantization, both ready, the same artifact). Writes JSON and prints a table.

    python -m tests.bench.load_time_quant --out tests/bench/figures/load_time_gptq_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402
from conftest import ServerProcess  # noqa: E402


def watch(server: ServerProcess, timeout: float) -> dict:
    """Poll /ready until 200: when the port answered, when each stage was first seen, when ready."""
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    bound = None
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited {server.proc.returncode}: {server.log_text()}")
        try:
            r = httpx.get(server.base_url + "/ready", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        now = time.monotonic() - t0
        bound = bound if bound is not None else now
        if r.status_code == 200:
            return {"bound_s": round(bound, 2), "ready_s": round(now, 2), "stages": _durations(seen, now)}
        for row in r.json().get("loading", {}).values():
            seen.setdefault(row["stage"], now)
        time.sleep(0.2)
    raise TimeoutError(server.log_text())


def _durations(seen: dict[str, float], end: float) -> dict[str, float]:
    order = sorted(seen.items(), key=lambda kv: kv[1])
    ends = [t for _, t in order[1:]] + [end]
    return {stage: round(e - t, 2) for (stage, t), e in zip(order, ends)}


def artifacts(cache: Path) -> list[dict]:
    out = []
    for manifest in sorted((cache / "quantized").glob("*/slimserve.json")):
        m = json.loads(manifest.read_text())
        out.append({"folder": manifest.parent.name, "seconds": m.get("seconds"),
                    "calibration": m.get("calibration"), "bytes": m.get("bytes_after")})
    return out


def outcome(log: str) -> str:
    """What a server's log says it did with the cache entry (server/quantize_at_load.py's lines)."""
    waited = "waiting for another server quantizing" in log
    if "quantized into" in log:
        return "quantized"
    if "reusing the cached" in log:
        return "waited, then reused" if waited else "reused"
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--quantization", default="gptq")
    ap.add_argument("--extra", action="append", default=[], help="extra serve flag (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=Path("tests/bench/figures/load_time_gptq_smollm2.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slimserve-ltq-"))
    base = ["--model", args.model, "--engine", args.engine, "--quantization", args.quantization, *args.extra]
    result = {"cpu": describe(), "command": " ".join(sys.argv), "serve_flags": base}

    def start(cache: Path, name: str) -> ServerProcess:
        return ServerProcess([*base, "--cache-dir", str(cache)], log_path=work / f"{name}.log")

    cache = work / "cache-one"
    for run in ("first_start", "second_start"):
        server = start(cache, run)
        try:
            result[run] = watch(server, args.timeout)
        finally:
            server.stop()
        print(f"{run}: ready in {result[run]['ready_s']} s, stages {result[run]['stages']}", flush=True)
    result["artifacts_one"] = artifacts(cache)

    shared = work / "cache-shared"
    pair = [start(shared, "together_a"), start(shared, "together_b")]
    try:
        with ThreadPoolExecutor(2) as pool:  # watched at once: each server's own time to ready
            result["together"] = list(pool.map(lambda s: watch(s, args.timeout), pair))
    finally:
        for s in pair:
            s.stop()
    logs = [(work / f"together_{x}.log").read_text(errors="replace") for x in "ab"]
    result["together_artifacts"] = artifacts(shared)
    result["together_outcome"] = [outcome(log) for log in logs]
    print(f"together: ready in {[r['ready_s'] for r in result['together']]} s, {result['together_outcome']}, "
          f"{len(result['together_artifacts'])} artifact(s) in the shared cache", flush=True)
    speedup = result["first_start"]["ready_s"] / result["second_start"]["ready_s"]
    result["second_vs_first"] = round(speedup, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
