"""Where every bench script's result goes: a JSON file (the machine and the command inside it) and,
when the script draws one, a PNG beside it with the same name (`pyplot` and `save_figure` for the
drawing's start and end)."""

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


def pyplot():
    """matplotlib's pyplot on the file-only backend (bench machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, footer: str | None = None, dpi: int = 110) -> None:
    """Lay out, write and free a figure; `footer`: small wrapped lines under the axes (commands, settings)."""
    import textwrap

    import matplotlib.pyplot as plt

    if footer:
        fig.text(0.01, 0.01, "\n".join(textwrap.fill(line, 150) for line in footer.splitlines()), fontsize=6,
                 va="bottom")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
