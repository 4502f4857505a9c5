"""The multi-model part of serve.yaml: `models:` (one entry per served model) and `router:` (policies
for the virtual model `auto`). Plain pydantic models, validated at start so a typo names itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from server.model_settings import MODEL_SETTINGS, RECIPE, ModelSetting, not_none

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$"
AUTO = "auto"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _recipe_field(s: ModelSetting) -> tuple[Any, Any]:
    if s.recipe == "method":
        return not_none(s.type), ...
    return s.type | None, Field(None, description=s.help, **s.limits)


class QuantizationRecipe(create_model("_Recipe", __base__=_Strict, **{s.recipe: _recipe_field(s) for s in RECIPE})):
    """`quantization:` as a mapping in a model entry: the load-time recipe of that model alone (its keys
    are the quant_* settings of server/model_settings.py without their prefix)."""

    def as_settings(self) -> dict[str, Any]:
        names = {s.recipe: s.name for s in RECIPE}
        return {names[k]: v for k, v in self.model_dump(exclude_none=True).items()}


def _entry_field(s: ModelSetting) -> tuple[Any, Any]:
    if s.entry_type is not None:
        return s.entry_type, Field(s.entry_default, description=s.help, **s.limits)
    tp = not_none(s.type) | QuantizationRecipe if s.recipe == "method" else s.type
    return tp | None, Field(None, description=s.help, **s.limits)


# the per-model settings (server/model_settings.py) a `models:` entry may carry; left out: the top-level value
_PerModelEntry = create_model("_PerModelEntry", __base__=_Strict, name=(str, Field(..., pattern=NAME_PATTERN)), **{
    s.name: _entry_field(s) for s in MODEL_SETTINGS if s.recipe in (None, "method")})


class ModelEntry(_PerModelEntry):
    """One served model: the per-model settings (inherited above) and what only an entry has."""

    # speculative decoding: another entry's name (or a model folder) proposes tokens this model verifies
    draft: str | None = None
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    # engine: remote
    base_url: str | None = Field(None, pattern=r"^https?://")
    api_key_env: str | None = Field(None, description="environment variable holding the upstream key")
    upstream_model: str | None = None
    timeout: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.name == AUTO or self.name.startswith(AUTO + ":"):
            raise ValueError(f"'{AUTO}' is the router's name; pick another model name")
        if self.engine == "remote":
            if not self.base_url:
                raise ValueError(f"model '{self.name}': engine remote needs base_url")
            local_only = [k for k in ("model", "quantization", "draft", "speculative_config")
                          if getattr(self, k) is not None]
            if local_only:
                raise ValueError(f"model '{self.name}': {local_only[0]} does not apply to a remote engine")
        elif self.base_url or self.api_key_env or self.upstream_model:
            raise ValueError(f"model '{self.name}': base_url/api_key_env/upstream_model need engine: remote")
        if self.draft and self.speculative_config:
            raise ValueError(f"model '{self.name}': give draft or speculative_config, not both")
        return self


class FixedPolicy(_Strict):
    type: Literal["fixed"]
    target: str
    fallback: list[str] = Field(default_factory=list)


class Rule(_Strict):
    """Every condition given must hold; the first rule that matches picks the target."""

    target: str
    prompt_tokens_over: int | None = Field(None, ge=0)
    prompt_tokens_under: int | None = Field(None, ge=1)
    max_tokens_over: int | None = Field(None, ge=0)
    max_tokens_under: int | None = Field(None, ge=1)
    regex: str | None = Field(None, description="searched in the last user message (or the prompt)")
    header: str | None = Field(None, description="request header name; with header_value, a regex on its value")
    header_value: str | None = None

    @model_validator(mode="after")
    def _check(self):
        import re

        for pattern in (self.regex, self.header_value):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"bad regex {pattern!r}: {exc}") from exc
        return self


class RulesPolicy(_Strict):
    type: Literal["rules"]
    rules: list[Rule] = Field(..., min_length=1)
    default: str
    fallback: list[str] = Field(default_factory=list)


class CascadePolicy(_Strict):
    type: Literal["cascade"]
    student: str
    teacher: str
    metric: Literal["mean_logprob", "min_logprob"] = "mean_logprob"
    threshold: float = Field(..., le=0, description="escalate when the student's confidence is below this")
    first_tokens: int = Field(8, ge=1, le=256, description="streamed: tokens the decision waits for")


class LearnedPolicy(_Strict):
    type: Literal["learned"]
    path: Path = Field(..., description="folder written by `slimserve compress calibrate-router`")
    student: str
    teacher: str
    threshold: float | None = Field(None, ge=0, le=1, description="default: the one calibrated")


Policy = Annotated[FixedPolicy | RulesPolicy | CascadePolicy | LearnedPolicy, Field(discriminator="type")]


class FallbackSettings(_Strict):
    max_waiting: int = Field(64, ge=0, description="a local target with more waiting requests is skipped")
    unhealthy_seconds: float = Field(10.0, ge=0, description="a remote that refused a connection is skipped this long")


class RouterSettings(_Strict):
    default: str
    policies: dict[str, Policy] = Field(..., min_length=1)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)

    @model_validator(mode="after")
    def _check(self):
        if self.default not in self.policies:
            raise ValueError(f"router.default '{self.default}' is not one of the policies: {sorted(self.policies)}")
        return self

    def targets(self) -> set[str]:
        names: set[str] = set()
        for p in self.policies.values():
            if isinstance(p, FixedPolicy):
                names |= {p.target, *p.fallback}
            elif isinstance(p, RulesPolicy):
                names |= {p.default, *p.fallback, *(r.target for r in p.rules)}
            else:
                names |= {p.student, p.teacher}
        return names
