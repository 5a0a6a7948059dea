"""One-line configuration errors, worded from the rules declared on the resource fields.

The rules live once, on the resources (pydantic constraints and validators); this module
only turns a `ValidationError` into the line a person reads, naming the setting the way
they wrote it (an environment variable for the CLI, an attribute for a `defs.yaml`).

Example::

    >>> names = {"max_concurrency": "FLUX2_MAX_CONCURRENCY"}
    >>> try:
    ...     RunComfyResource(max_concurrency="lots")
    ... except ValidationError as exc:
    ...     print(settings_error(exc, RunComfyResource, names))
    FLUX2_MAX_CONCURRENCY must be a whole number from 1 to 4096, got 'lots'
"""

from __future__ import annotations

import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


class SettingsError(ValueError):
    """A missing or malformed setting; the message is one line naming the setting."""


def settings_error(
    exc: ValidationError,
    model: type[BaseModel],
    names: Mapping[str, str] | None = None,
    secret: Collection[str] = (),
) -> SettingsError:
    """The first problem of `exc` as one line: `<setting> must be <rule>, got <value>`.

    `names` maps field names to what the user wrote (default: the field name); values
    of `secret` fields are never shown.
    """
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    name = (names or {}).get(field, field)
    if error["type"] == "value_error":
        rule = str(error.get("ctx", {}).get("error", error["msg"]))
    elif field in model.model_fields:
        rule = "must be " + describe_rule(model.model_fields[field])
    else:
        rule = str(error["msg"]).lower()
    shown = "" if field in secret or error["type"] == "value_error" else _shown(error)
    return SettingsError(f"{name} {rule}{shown}".replace("\n", " "))


def describe_rule(info: FieldInfo) -> str:
    """`a whole number from 1 to 4096`, from a field's type and constraints."""
    kind = _kind(info.annotation)
    low = high = None
    low_open = False
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge | annotated_types.Gt):
            low = item.ge if isinstance(item, annotated_types.Ge) else item.gt
            low_open = isinstance(item, annotated_types.Gt)
        if isinstance(item, annotated_types.Le):
            high = item.le
    if low is not None and high is not None:
        return f"{kind} from {_num(low)} to {_num(high)}"
    if low is not None:
        return f"{kind} {'above' if low_open else 'of at least'} {_num(low)}"
    if high is not None:
        return f"{kind} of at most {_num(high)}"
    return kind


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if len(args) == 1 else annotation
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a number"
    if typing.get_origin(annotation) is dict:
        return "a mapping"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(annotation))
    return "text"


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(error: Mapping[str, Any]) -> str:
    value = error.get("input")
    if value is None or isinstance(value, dict):
        return ""
    return f", got {str(value)[:80]!r}"
