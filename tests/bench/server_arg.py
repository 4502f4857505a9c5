"""The server a bench script talks to: a running one (`--base-url`), or a `slimserve serve` started for
the run (tests/conftest.py's ServerProcess, on a free port) and stopped after it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Served:
    base_url: str
    pid: int | None  # the started server's process; None for a running one (--base-url)


def add_server_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base-url", help="a running server; otherwise one is started (see --server-arg)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")


@contextmanager
def serving(args: list[str], log_path: Path, *, base_url: str | None = None, timeout: float = 900,
            env: dict[str, str] | None = None) -> Iterator[Served]:
    """`base_url` where given; otherwise `slimserve serve ARGS` (log in `log_path`), ready within
    `timeout` seconds, stopped when the block ends."""
    if base_url is not None:
        yield Served(base_url, None)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import ServerProcess

    server = ServerProcess(args, env=env, log_path=log_path)
    try:
        server.wait_ready(timeout)
        yield Served(server.base_url, server.proc.pid)
    finally:
        server.stop()
