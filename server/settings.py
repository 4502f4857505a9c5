"""Serve settings: the only place that reads environment variables and serve.yaml.

Priority, highest first: command-line flags, `SLIMSERVE_*` environment variables, the YAML file,
the defaults below. A bad value stops start-up with a message that names the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict

from server.default_model import DEFAULT_MODEL_ID
from server.errors import ConfigError
from server.model_config import ModelEntry, QuantizationRecipe, RouterSettings
from server.model_settings import BY_NAME, MODEL_SETTINGS


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "slimserve"


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="forbid", protected_namespaces=())


# the per-model settings (server/model_settings.py) at the top level: the single model, or every model's default
_PerModel = create_model("_PerModel", __base__=_Base, **{
    s.name: (s.type, Field(s.default, description=s.help, **s.limits)) for s in MODEL_SETTINGS})


class ServeSettings(_PerModel):
    """Every `slimserve serve` setting: the per-model ones (inherited above), then the server's own."""

    served_model_name: str | None = Field(None, description="id clients use; defaults to the model's name")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    lora: Annotated[list[str], NoDecode] = Field(default_factory=list, description="NAME=PATH adapters, pinned")
    adapter_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_loras: int = Field(8, ge=1, le=1024, description="adapters resident at once")
    max_lora_rank: int = Field(64, ge=1, le=1024)
    admin_key: str | None = Field(None, min_length=1, description="key for adapter load/unload")
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace: float = Field(30.0, ge=0, description="SIGTERM: seconds in-flight requests get to finish")
    metrics_public: bool = Field(False, description="serve /metrics without an API key (scrapers, endpoint pickers)")
    # several models in one server (serve.yaml); empty: the single model the settings above describe
    models: list[ModelEntry] = Field(default_factory=list)
    router: RouterSettings | None = None
    # limits (hardening): bounded work per request and per model, logging, test-only fault injection
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request body accepted (413 above)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompt tokens per choice; default: the context")
    max_tokens_limit: int = Field(32768, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(16, ge=1, le=128, description="largest n (choices per prompt)")
    max_stop: int = Field(8, ge=0, le=64, description="stop strings per request")
    max_stop_chars: int = Field(256, ge=1, description="characters per stop string")
    max_waiting: int = Field(256, ge=0, description="requests waiting per model before 429 + Retry-After")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429")
    log_format: Literal["text", "json"] = "text"
    strict_fields: bool = Field(False, description="refuse unknown request fields (400) instead of ignoring them "
                                                   "and naming them in the x-slimserve-ignored-fields header")
    fault_inject: bool = Field(False, description="tests only: honour the x-slimserve-fault request header")

    @field_validator("api_keys", "lora", "adapter_roots", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        if isinstance(value, str):  # SLIMSERVE_API_KEYS="k1,k2"
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("lora")
    @classmethod
    def _name_equals_path(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"expected NAME=PATH, got {item!r}")
        return value

    def lora_pairs(self) -> list[tuple[str, Path]]:
        return [(i.partition("=")[0], Path(i.partition("=")[2]).expanduser()) for i in self.lora]

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, value: list[str]) -> list[str]:
        if any(not k for k in value):
            raise ValueError("API keys must not be empty")
        return value

    def vllm_options(self) -> dict[str, Any]:
        keys = [s.name for s in MODEL_SETTINGS if s.vllm]
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def model_id(self) -> str:
        return self.served_model_name or _name_of(self.model)

    @model_validator(mode="after")
    def _check_models(self):
        names = [e.name for e in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        known = set(names) if self.models else {self.model_id}
        for e in self.models:
            if e.draft and e.draft not in known and not Path(e.draft).expanduser().is_dir():
                raise ValueError(f"model '{e.name}': draft '{e.draft}' is neither a model entry nor a folder")
        if self.router is not None:
            missing = sorted(self.router.targets() - known)
            if missing:
                raise ValueError(f"router names models that are not served: {missing}; served: {sorted(known)}")
        return self

    def entries(self) -> list[ModelEntry]:
        """The served models; a single-model configuration is one entry built from the top level."""
        if self.models:
            return list(self.models)
        # constructed, not validated: a single model's id is whatever the operator named it (a path, a hub id)
        return [ModelEntry.model_construct(name=self.model_id, model=self.model, engine=self.engine)]

    def for_entry(self, entry: ModelEntry) -> "ServeSettings":
        """The top-level settings with this entry's own fields laid over them (for one engine)."""
        own = {k: v for k, v in entry.model_dump(exclude_unset=True).items() if k in BY_NAME}
        if isinstance(own.get("quantization"), dict):  # the serve.yaml mapping form: its keys are settings
            own.update(QuantizationRecipe.model_validate(own.pop("quantization")).as_settings())
        own.setdefault("model", self.model)
        return self.model_copy(update={**own, "served_model_name": entry.name, "models": [], "router": None})


def _name_of(model: str) -> str:
    if model == DEFAULT_MODEL_ID:
        return model
    path = Path(model)
    return path.name if path.exists() else model


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(config: Path | None = None, **overrides: Any) -> ServeSettings:
    """Build settings from flags (`overrides`, None meaning unset), env and the YAML file."""
    yaml_values = _read_yaml(Path(config)) if config else {}
    flags = {k: v for k, v in overrides.items() if v is not None and v != []}

    class _Layered(ServeSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=yaml_values)

    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        err = exc.errors()[0]
        setting = ".".join(str(p) for p in err["loc"]) or "settings"
        hint = " (unknown setting)" if err["type"] == "extra_forbidden" else ""
        raise ConfigError(setting, f"{err['msg']}{hint}; got {err.get('input')!r}") from exc
    # attributes, not model_dump(): nested entries stay models rather than dicts
    return ServeSettings.model_construct(**{k: getattr(layered, k) for k in ServeSettings.model_fields})
