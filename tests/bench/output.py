"""Where every bench script's result goes: a JSON file (the machine and the command inside it) and,
when the script draws one, a PNG beside it with the same name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_result(result: dict, out: Path, plot: Callable[[dict, Path], None] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if plot is None:
        print(f"wrote {out}")
        return
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
