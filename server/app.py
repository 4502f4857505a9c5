"""create_app(): the FastAPI application, its lifespan and its routes. Nothing here runs at import."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.engines.base import Engine
from server.http_errors import install_error_handlers
from server.request_log import install_request_log
from server.metrics import Metrics
from adapters.registry import AdapterRegistry
from server.routes import adapters, chat, completions, health, models
from server.settings import ServeSettings
from server.state import AppState

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings, engines: dict[str, Engine] | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """Build the app. Engines passed in are started here; otherwise they are loaded from settings.
    `metrics`: the ones the loading phase already wrote to (the load-progress gauge)."""
    state = AppState(settings=settings, metrics=metrics or Metrics(), created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engines is None:
            from server.engines.factory import build_engines

            state.engines = await asyncio.to_thread(build_engines, settings)
        else:
            state.engines = dict(engines)
        for model_id, engine in state.engines.items():
            await engine.start()
            state.metrics.model_loaded(model_id, engine.weight_bytes, type(engine).__name__,
                                       getattr(engine, "quantization", None))
            if engine.capabilities.adapters:
                state.adapters[model_id] = AdapterRegistry(
                    model_id, engine, roots=settings.adapter_roots, max_loras=settings.max_loras,
                    max_rank=settings.max_lora_rank, events=state.metrics)
        if settings.router is not None:
            from server.routing.router import Router

            state.routing = Router(settings.router, state)
        if settings.lora:
            registry = state.registry()
            for name, path in settings.lora_pairs():  # operator-given: pinned, and may live outside the roots
                await registry.load(name, path, pinned=True, source="startup")
        state.ready = True
        log.info("serving %s", ", ".join(state.engines))
        try:
            yield
        finally:
            state.ready = False
            for engine in state.engines.values():
                await engine.shutdown()

    app = FastAPI(title="slimserve", version=__version__, lifespan=lifespan)
    app.state.slim = state
    install_error_handlers(app)
    install_request_log(app, settings)  # x-request-id, one log line per request, body limit
    for module in (chat, completions, models, adapters, health):
        app.include_router(module.router)
    return app
