"""Every setting, declared once: on the pydantic field that holds it.

A field is a setting when its `json_schema_extra` comes from `setting(...)`, which names
its environment variable, whether it may hold a secret, and its flat name when that is
not the field's own (the `Flux2EditsComponent` attribute, the key `build_resources`
takes). The field holds the rest: type, default, bounds, and its meaning as the
description. `settings_of` reads the fields back as `Setting`s; the resource bundle, the
environment reader, the Component's attributes and docs/settings.md are all made from them.

Example::

    >>> from pydantic import BaseModel, Field
    >>> class Knobs(BaseModel):
    ...     speed: int = Field(
    ...         default=2, ge=1, description="How fast.", json_schema_extra=setting("SPEED")
    ...     )
    >>> [(s.name, s.variable, s.rule, s.default) for s in settings_of(Knobs).values()]
    [('speed', 'SPEED', 'a whole number of at least 1', 2)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flux2_pipeline.resources.errors import describe_rule

_MARK = "flux2/setting"


def setting(
    variable: str | None, *, name: str | None = None, secret: bool = False, attribute: bool = True
) -> dict[str, Any]:
    """The `json_schema_extra` that makes a field a setting.

    `variable` is its environment variable (None: set in code or YAML only); `name` its
    flat name when not the field's; `secret` that it may hold one (kept as an `EnvVar`,
    never shown in errors); `attribute=False` that `Flux2EditsComponent` has no attribute
    for it (the command line alone reads it).
    """
    mark = {"variable": variable, "name": name, "secret": secret, "attribute": attribute}
    return {_MARK: mark}


@dataclass(frozen=True)
class Setting:
    """One setting: its flat name and variable, and the field holding its rule and meaning."""

    name: str
    variable: str | None
    model: type[BaseModel]
    field: str
    secret: bool
    attribute: bool

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

    @property
    def label(self) -> str:
        """How a person sets it: the variable, else the flat name."""
        return self.variable or self.name


def settings_of(*models: type[BaseModel]) -> dict[str, Setting]:
    """The settings the fields of `models` declare, by flat name, in declaration order."""
    found: dict[str, Setting] = {}
    for model in models:
        for field, info in model.model_fields.items():
            extra = info.json_schema_extra
            mark = extra.get(_MARK) if isinstance(extra, dict) else None
            if isinstance(mark, dict):
                name = str(mark["name"] or field)
                variable = mark["variable"]
                found[name] = Setting(
                    name,
                    None if variable is None else str(variable),
                    model,
                    field,
                    bool(mark["secret"]),
                    bool(mark["attribute"]),
                )
    return found


def markdown_table(settings: Iterable[Setting]) -> str:
    """A Markdown table of `settings`: variable, attribute, type, default, meaning."""
    lines = [
        "| Variable | Component attribute | Type | Default | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for item in settings:
        variable = f"`{item.variable}`" if item.variable else "(none)"
        attribute = f"`{item.name}`" if item.attribute else "(command line only)"
        default = "unset" if item.default in (None, {}) else f"`{item.default}`"
        meaning = item.meaning + (" A secret: kept as an `EnvVar`." if item.secret else "")
        cells = (variable, attribute, item.rule, default, meaning.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
