"""`slimserve compress cost MODEL`: measure what one output token of a model costs, loaded as the
PyTorch engine serves it (dtype, device, load-time int8/int4 kernels), and record it in the model
folder's manifest (`--write`) for the router to read. A model quantized in process at load keeps
serving from the original folder, so its cost is printed as a serve.yaml `cost:` instead."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from server.errors import ConfigError


def add_parser(csub) -> None:
    c = csub.add_parser("cost", help="measure a model's cost per output token (for cost-aware routing)",
                        description="Greedy batch-1 decode with a KV cache, as the engine serves the model: CPU "
                                    "seconds per token on CPU (all threads), wall seconds on a GPU; weight bytes and "
                                    "KV bytes per token. --write records it in the folder's slimserve.json.")
    c.add_argument("model", help="model folder or the embedded default")
    c.add_argument("--quantization", choices=["int8", "int4", "nf4"], help="quantize at load, as `serve` does")
    c.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    c.add_argument("--device", default="auto")
    c.add_argument("--steps", type=int, default=64, help="tokens timed (after 4 untimed)")
    c.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept")
    c.add_argument("--write", action="store_true", help="record the cost in the model folder's slimserve.json")
    c.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")


def run(args: argparse.Namespace) -> int:
    from compress.cost import measure_cost, write_cost
    from server.engines.factory import resolve_model
    from server.engines.torch.engine import TorchEngine

    folder = Path(resolve_model(args.model, args.cache_dir))
    if not (folder / "config.json").is_file():
        raise ConfigError("model", f"{folder} is not a model folder")
    engine = TorchEngine.load(folder.name, folder, dtype=args.dtype, device=args.device,
                              quantization=args.quantization)
    how = f"slimserve compress cost{' --quantization ' + args.quantization if args.quantization else ''}"
    runs = sorted((measure_cost(engine.model, steps=args.steps, how=how) for _ in range(max(1, args.repeats))),
                  key=lambda c: c.seconds_per_token)
    cost = runs[len(runs) // 2]
    print(json.dumps(cost.as_dict(), indent=2))
    if args.write and args.quantization:
        print("quantized in process: the folder's manifest describes the unquantized model; in serve.yaml:")
        print(yaml.safe_dump({"cost": cost.as_dict()}, sort_keys=False), end="")
    elif args.write:
        print(f"wrote {write_cost(folder, cost)}")
    return 0
