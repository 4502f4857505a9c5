"""The listening socket is bound before the models load, and a small stdlib HTTP server answers on
it while they do: `/health` 200 (the process is alive: a liveness probe must not kill a server that
is quantizing), `/ready` 503 naming each model's stage and progress, `/metrics` with the load
gauge, and every API path 503 in the OpenAI error shape with Retry-After. Loading stays on the main
thread (vLLM starts its engine process from there); once it is done this server stops and uvicorn
serves the very same socket, so no connection is refused in between: it waits in the backlog."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST

RETRY_AFTER_S = 5


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, as uvicorn would make it (it accepts it through run(sockets=...))."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _handler(snapshot: Callable[[], dict], metrics_text: Callable[[], bytes] | None):
    class LoadingHandler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str = "application/json", retry: bool = False):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if retry:
                self.send_header("Retry-After", str(RETRY_AFTER_S))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _answer(self):
            path = self.path.split("?", 1)[0]
            if path == "/health":
                return self._send(200, json.dumps({"status": "ok", "loading": True}).encode())
            if path == "/ready":
                body = {"ready": False, "draining": False, "loading": snapshot()}
                return self._send(503, json.dumps(body).encode(), retry=True)
            if path == "/metrics" and metrics_text is not None:
                return self._send(200, metrics_text(), CONTENT_TYPE_LATEST)
            stages = ", ".join(f"{m}: {r.get('detail', r['stage'])}" for m, r in snapshot().items())
            error = {"message": f"the server is still loading its models ({stages or 'starting'}); "
                                f"GET /ready says when it is done", "type": "service_unavailable",
                     "param": None, "code": "loading"}
            self._send(503, json.dumps({"error": error}).encode(), retry=True)

        def _drain_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= 1 << 20:
                self.rfile.read(length)
            elif length:
                self.close_connection = True  # too big to read for a 503: close instead

        def do_GET(self):
            self._answer()

        def do_HEAD(self):
            self._answer()

        def do_POST(self):
            self._drain_body()
            self._answer()

        do_PUT = do_DELETE = do_PATCH = do_POST

        def log_message(self, *args):  # the request log proper starts with the app
            pass

    return LoadingHandler


@contextmanager
def answering_while_loading(sock: socket.socket, snapshot: Callable[[], dict],
                            metrics_text: Callable[[], bytes] | None) -> Iterator[None]:
    """Serve status on `sock` until the block ends; the socket stays open for uvicorn."""
    server = ThreadingHTTPServer(sock.getsockname()[:2], _handler(snapshot, metrics_text), bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="loading-http",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()  # stops accepting; the socket is not closed (no server_close)
        thread.join()
