"""`slimserve compress warm` and `slimserve compress cache ls|rm`: the quantized-model cache from the
command line. `warm` runs exactly what `serve` runs before loading (server/quantize_at_load.py), for
every model of a serve.yaml, so a Job can fill a shared volume before the serving pods start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.quant_cache import cache_root, entries, remove
from server.engines.factory import lora_enabled, preflight
from server.errors import ConfigError
from server.load_progress import LoadProgress
from server.quantize_at_load import quantized_path, wants_quantizing
from server.settings import load_settings

log = logging.getLogger(__name__)


def warm(config: Path, cache_dir: Path | None) -> int:
    from server.request_log import configure_logging

    settings = load_settings(config, cache_dir=cache_dir)
    configure_logging(settings.log_level, settings.log_format)  # one line per stage
    progress = LoadProgress()
    chosen = [(local, source) for local, source in preflight(settings, progress).values()
              if wants_quantizing(local, source)]
    if not chosen:
        raise ConfigError("config", f"no model in {config} is quantized at load (quantization: gptq | awq | rtn)")
    for local, source in chosen:
        folder = quantized_path(local, source, progress, lora=lora_enabled(local))
        print(f"{local.model_id}: {folder}")
    return 0


def cache_command(action: str, names: list[str], cache_dir: Path, *, as_json: bool = False) -> int:
    if action == "rm":
        if not names:
            raise ConfigError("names", "name the entries to remove (as `slimserve compress cache ls` prints them)")
        for name in names:
            try:
                freed = remove(cache_dir, name)
            except FileNotFoundError as exc:
                raise ConfigError("names", str(exc)) from None
            print(f"removed {name} ({_size(freed)})")
        return 0
    rows = entries(cache_dir)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no quantized models in {cache_root(cache_dir)}")
        return 0
    for r in rows:
        state = "" if r["complete"] else "  (incomplete: an interrupted run; safe to rm)"
        print(f"{r['name']}  {_size(r['bytes'])}  {r['method']}-{r['bits']}  from {r['source_model']}  "
              f"{r['created']}{state}")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
