"""What the running app holds: settings, engines by served id, adapter registries, metrics.
Built in create_app, never at import."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from server.engines.base import Engine
from server.errors import NotFound
from server.metrics import Metrics
from server.settings import ServeSettings


@dataclass
class AppState:
    settings: ServeSettings
    metrics: Metrics
    engines: dict[str, Engine] = field(default_factory=dict)
    adapters: dict[str, AdapterRegistry] = field(default_factory=dict)  # base model id -> its adapters
    ready: bool = False
    draining: bool = False  # SIGTERM received: finish what runs, take nothing new
    created: int = 0
    routing: object | None = None  # server.routing.router.Router, when serve.yaml has a router section

    def router(self):
        if self.routing is None:
            raise NotFound("no router is configured (serve.yaml `router:` section); name a model instead",
                           param="model", code="model_not_found")
        return self.routing

    def metric_labels(self, model: str | None) -> tuple[str, str]:
        """(model, adapter) labels for a request that named `model`; unknown names get ("", "")."""
        if model is None:
            return "", ""
        if model in self.engines or (self.routing is not None and model in self.routing.model_ids()):
            return model, ""
        for base, registry in self.adapters.items():
            if any(ref.name == model for ref in registry.list()):
                return base, model
        return "", ""

    def registry(self, base: str | None = None) -> AdapterRegistry:
        if base is None:
            if not self.adapters:
                raise NotFound("no model here serves adapters", param="base_model")
            return next(iter(self.adapters.values()))
        if base not in self.adapters:
            raise NotFound(f"the base model '{base}' does not exist", param="base_model")
        return self.adapters[base]
