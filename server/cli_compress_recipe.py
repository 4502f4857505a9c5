"""`slimserve compress sensitivity` and `slimserve compress recipe`: the CLI edge of
compress/sensitivity.py and compress/recipe.py (model names resolved here, errors as ConfigError)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.settings import ConfigError


def add_parsers(csub, cache_dir: Path) -> None:
    s = csub.add_parser("sensitivity", help="KL each linear layer costs when it alone is quantized",
                        description="Writes scan JSON and a heatmap PNG; `compress quantize --sensitivity` reads it.")
    s.add_argument("model")
    s.add_argument("--text", type=Path, required=True, help="calibration text (not the held-out text)")
    s.add_argument("--out", type=Path, default=Path("sensitivity.json"))
    s.add_argument("--bits", type=int, default=4)
    s.add_argument("--group-size", type=int, default=64)
    s.add_argument("--sym", dest="sym", action="store_true", default=True)
    s.add_argument("--asym", dest="sym", action="store_false")
    s.add_argument("--windows", type=int, default=2, help="token windows of --seq-len scored per layer")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--cache-dir", type=Path, default=cache_dir)
    r = csub.add_parser("recipe", help="run a YAML recipe: prune -> distill -> quantize -> eval, resumable",
                        description="Each stage's artifact and manifest are kept under the recipe's workdir; a "
                                    "rerun skips finished stages and redoes changed ones.")
    r.add_argument("recipe", type=Path)
    r.add_argument("--cache-dir", type=Path, default=cache_dir)


def run(args: argparse.Namespace, model_dir) -> int:
    if args.compress_command == "sensitivity":
        from compress.sensitivity import scan, write_scan

        if not args.text.is_file():
            raise ConfigError("text", f"no such file: {args.text}")
        try:
            result = scan(Path(model_dir(args.model, args.cache_dir)), args.text, bits=args.bits,
                          group_size=args.group_size, sym=args.sym, windows=args.windows, seq_len=args.seq_len)
        except ValueError as exc:
            raise ConfigError("sensitivity", str(exc)) from None
        write_scan(result, args.out)
        for row in sorted(result["modules"], key=lambda r: r["kl"], reverse=True)[:10]:
            print(f"  {row['name']:<40} KL {row['kl']:.5f}")
        print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({result['seconds']} s)")
        return 0
    from compress.recipe import RecipeError, load_recipe, run as run_recipe

    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as exc:
        raise ConfigError("recipe", str(exc)) from None
    stages = run_recipe(recipe, Path(model_dir(recipe["model"], args.cache_dir)))
    print(json.dumps(stages, indent=2))
    return 0
