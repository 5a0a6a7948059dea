"""Every setting, declared once: on the pydantic field that holds its type, default,
bounds and meaning (the description). `setting(...)`, as its `json_schema_extra`, adds the
environment variable and the flat name (the `Flux2EditsComponent` attribute); the resource
bundle, the environment reader, the Component and docs/settings.md read them back.

Example::

    >>> from pydantic import BaseModel, Field
    >>> class Knobs(BaseModel):
    ...     speed: int = Field(2, ge=1, description="How fast.", json_schema_extra=setting("SPEED"))
    >>> [(s.name, s.variable, s.rule, s.default) for s in settings_of(Knobs).values()]
    [('speed', 'SPEED', 'a whole number of at least 1', 2)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dagster import EnvVar
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from flux2_pipeline.resources.errors import describe_rule, settings_error

M = TypeVar("M", bound=BaseModel)


def setting(
    variable: str | None, *, name: str | None = None, secret: bool = False, attribute: bool = True
) -> dict[str, Any]:
    """Marks a field as a setting read from `variable` (None: set in code or YAML only);
    `secret`: kept as an `EnvVar`, never shown; `attribute=False`: not on the Component."""
    mark = {"variable": variable, "name": name, "secret": secret, "attribute": attribute}
    return {"flux2/setting": mark}


@dataclass(frozen=True)
class Setting:
    """One setting: its flat name and variable, and the field holding its rule and meaning."""

    name: str
    variable: str | None
    model: type[BaseModel]
    field: str
    secret: bool = False
    attribute: bool = True

    @property
    def info(self) -> FieldInfo:
        """The pydantic field: type, default, bounds and description."""
        return self.model.model_fields[self.field]

    @property
    def default(self) -> Any:
        """The value when unset."""
        return self.info.get_default(call_default_factory=True)

    @property
    def meaning(self) -> str:
        """One line on what it does (the field's description)."""
        return self.info.description or ""

    @property
    def rule(self) -> str:
        """What a value must be, e.g. `a whole number from 1 to 4096`."""
        return describe_rule(self.info)


def settings_of(*models: type[BaseModel]) -> dict[str, Setting]:
    """The settings the fields of `models` declare, by flat name, in declaration order."""
    found: dict[str, Setting] = {}
    for model in models:
        for field, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            mark: dict[str, Any] = dict(extra.get("flux2/setting") or {})  # type: ignore[arg-type]
            if mark:
                name = mark.pop("name") or field
                found[name] = Setting(name, model=model, field=field, **mark)
    return found


def checked(
    model: type[M],
    given: Mapping[str, Any],
    names: Mapping[str, str],
    env_names: Mapping[str, str] | None = None,
    **extra: Any,
) -> M:
    """`model` from the flat values of its settings in `given`, or a one-line `SettingsError`.

    Errors name a setting as `names` spells it (default: its flat name) and never show a
    secret; a secret named in `env_names` is then kept as an `EnvVar` of that variable.
    """
    own = settings_of(model).values()
    plain = {item.field: given[item.name] for item in own if item.name in given}
    try:
        built = model(**plain, **extra)  # the values themselves, checked once
    except ValidationError as exc:
        labels = {item.field: names.get(item.name, item.name) for item in own}
        raise settings_error(exc, model, labels, {i.field for i in own if i.secret}) from None
    env_names = env_names or {}
    secrets = [i for i in own if i.secret and i.name in env_names and i.field in plain]
    refs = {i.field: EnvVar(env_names[i.name]) for i in secrets}
    return model(**{**plain, **refs}, **extra) if refs else built
