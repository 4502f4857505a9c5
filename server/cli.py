"""The `slimserve` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.errors import ConfigError


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over the OpenAI API",
                       description="Every flag can also be set in the YAML file and as SLIMSERVE_<NAME>.")
    p.add_argument("--config", type=Path, help="serve.yaml with any of the settings below")
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the id clients send as `model`")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--engine", help="torch")
    p.add_argument("--dtype", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together")
    p.add_argument("--max-prefill-tokens", type=int)
    p.add_argument("--api-key", dest="api_keys", action="append", help="client key; repeat for several")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--log-level")
    p.add_argument("--lora", action="append", help="NAME=PATH: a pinned adapter loaded at start; repeatable")
    p.add_argument("--adapter-root", dest="adapter_roots", action="append", type=Path,
                   help="folder whose adapters may be loaded at runtime and just in time; repeatable")
    p.add_argument("--max-loras", type=int, help="adapters resident at once (least recently used evicted)")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--admin-key", help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.engines.factory import build_engines
    from server.settings import load_settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    settings = load_settings(args.config, **overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engines = build_engines(settings)  # load before binding, so a bad model fails at start
    app = create_app(settings, engines)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimserve", description="Serve compressed LLMs over the OpenAI API.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
    except ConfigError as exc:
        print(f"slimserve: {exc}", file=sys.stderr)
        return 2
    return 1
