"""What the running app holds: settings, engines by served id, metrics. Built in create_app, never at import."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engines.base import Engine
from server.errors import NotFound, Overloaded
from server.metrics import Metrics
from server.settings import ServeSettings


@dataclass
class AppState:
    settings: ServeSettings
    metrics: Metrics
    engines: dict[str, Engine] = field(default_factory=dict)
    ready: bool = False
    created: int = 0

    def engine_for(self, model: str) -> Engine:
        if not self.ready:
            raise Overloaded("the server is starting; models are not loaded yet")
        engine = self.engines.get(model)
        if engine is None:
            known = ", ".join(sorted(self.engines)) or "none"
            raise NotFound(f"the model '{model}' does not exist; served models: {known}", param="model",
                           code="model_not_found")
        return engine
