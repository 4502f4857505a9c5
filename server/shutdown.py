"""Graceful shutdown. On SIGTERM (or the first Ctrl-C): `/ready` turns 503 so load balancers stop
sending, new generation requests get 503, in-flight requests (streams included) run to the end or
until `shutdown_grace` seconds pass, then uvicorn stops and the process exits 0. A second signal
exits at once."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

log = logging.getLogger(__name__)
TRACKED_PREFIX = "/v1/"


class InFlight:
    """ASGI middleware counting API requests until their last byte is sent (streams included)."""

    def __init__(self, app):
        self.app = app
        self.count = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(TRACKED_PREFIX):
            return await self.app(scope, receive, send)
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, inflight: InFlight, grace: float):
        super().__init__(config)
        self.slim_state = state
        self.inflight = inflight
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain is not None or self._loop is None:  # second signal, or not started: stop now
            self.should_exit = True
            if self._drain is not None:
                self.force_exit = True
            return
        # not appended to uvicorn's captured signals: it would re-raise SIGTERM after shutdown (exit 143, not 0)
        self.slim_state.draining = True
        log.info("signal %s: draining %d in-flight request(s), up to %.0f s", signal.Signals(sig).name,
                 self.inflight.count, self.grace)
        self._drain = self._loop.create_task(self._wait_then_exit())

    async def _wait_then_exit(self) -> None:
        deadline = time.monotonic() + self.grace
        while self.inflight.count > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight.count:
            log.warning("grace period over: %d request(s) still running are cut off", self.inflight.count)
        else:
            log.info("drained")
        self.should_exit = True


def serve_until_drained(app, state, *, host: str, port: int, log_level: str, grace: float, sockets=None,
                        **uvicorn_options) -> None:
    """`sockets`: already listening (server/loading_server.bind), so no request is refused between the
    loading server and this one."""
    inflight = InFlight(app)
    config = uvicorn.Config(inflight, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=1, **uvicorn_options)
    DrainingServer(config, state, inflight, grace).run(sockets=sockets)
