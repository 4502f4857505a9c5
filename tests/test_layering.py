"""The dependency picture holds: cli -> app -> routes -> dispatch -> {routing, engines}; engines ->
adapters; compress and adapters import nothing from server; only the HTTP edge imports FastAPI.
Checked on the source (every import statement, lazy ones included), so a violation fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTTP = ("fastapi", "starlette", "uvicorn")
# the HTTP edge: the app, its routes and middleware, the error table's handlers, the process runner
HTTP_EDGE = ("server/app.py", "server/auth.py", "server/cli.py", "server/http_errors.py", "server/shutdown.py",
             "server/routes/")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in paths:
        for name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("folder", ["compress", "adapters"])
def test_offline_packages_import_nothing_from_server(folder):
    assert offending(files(folder), ("server",)) == []


def test_only_the_http_edge_imports_fastapi():
    below = [p for p in files("server", "adapters", "compress")
             if not str(p.relative_to(ROOT)).startswith(HTTP_EDGE)]
    assert offending(below, HTTP) == []


def test_engines_and_routing_know_nothing_above_them():
    above = ("server.routes", "server.dispatch", "server.answers", "server.app", "server.http_errors",
             "server.auth", "server.state", "server.request_log")
    assert offending(files("server/engines"), above + ("server.routing",)) == []
    assert offending(files("server/routing"), above) == []


def test_dispatch_does_not_reach_back_into_routes():
    paths = [ROOT / "server/dispatch.py", *files("server/answers")]
    assert offending(paths, ("server.routes", "server.app") + HTTP) == []
