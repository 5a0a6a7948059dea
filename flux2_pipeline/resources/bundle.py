"""The three resources built from one flat set of settings, validated once.

The CLI (from environment variables) and `Flux2EditsComponent` (from a `defs.yaml`) both
describe the pipeline as flat settings — `input_dir`, `api_token`, `budget_usd`... — and
both come here. A secret (`api_token`, a ledger URL with a password) is checked as a plain
value and then stored as an `EnvVar` naming where it came from, so Dagster's run storage
only ever holds the variable's name.

Example::

    resources = build_resources(
        {"input_dir": "data/prompts", "api_token": "sk-..."},
        env_names={"api_token": "RUNCOMFY_API_TOKEN"},
    )
    resources.as_dict()  # {"flux2_runcomfy": ..., "flux2_ledger": ..., "flux2_storage": ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dagster import ConfigurableResource
from sqlalchemy.engine import make_url

from flux2_pipeline.resources.catalogue import checked, settings_of
from flux2_pipeline.resources.errors import SettingsError
from flux2_pipeline.resources.ledger import LedgerResource
from flux2_pipeline.resources.runcomfy import RunComfyResource
from flux2_pipeline.resources.storage import Flux2Storage

SETTINGS = settings_of(Flux2Storage, RunComfyResource, LedgerResource)
"""Every flat setting the resources hold, by name (see `flux2_pipeline.resources.catalogue`)."""

SECRETS = frozenset(name for name, item in SETTINGS.items() if item.secret)
"""Settings that may hold a secret: never shown in errors, stored as `EnvVar`."""


@dataclass(frozen=True)
class Flux2Resources:
    """The resources the flux2 assets need, already validated."""

    runcomfy: RunComfyResource
    ledger: LedgerResource
    storage: Flux2Storage

    def as_dict(self, prefix: str = "flux2_") -> dict[str, ConfigurableResource]:  # type: ignore[type-arg]
        """By the resource keys the assets ask for (`prefix=""`: the keys of earlier versions)."""
        return {
            f"{prefix}runcomfy": self.runcomfy,
            f"{prefix}ledger": self.ledger,
            f"{prefix}storage": self.storage,
        }

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Dagster's resources do not survive pickling (their config schema does not), and
        # `flux2-pipeline materialize` hands its settings to worker processes: send each
        # resource as the fields that were set (an `EnvVar` stays an `EnvVar`, by name).
        return (
            Flux2Resources,
            (
                _ResourceRecipe.of(self.runcomfy),
                _ResourceRecipe.of(self.ledger),
                _ResourceRecipe.of(self.storage),
            ),
        )


@dataclass(frozen=True)
class _ResourceRecipe:
    """A resource as its class and the fields that were set; unpickles as the resource."""

    cls: type[ConfigurableResource]  # type: ignore[type-arg]
    fields: dict[str, Any]

    @classmethod
    def of(cls, resource: ConfigurableResource) -> _ResourceRecipe:  # type: ignore[type-arg]
        fields = {}
        for name in resource.model_fields_set:
            value = getattr(resource, name)
            fields[name] = cls.of(value) if isinstance(value, ConfigurableResource) else value
        return cls(type(resource), fields)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_build_resource, (self.cls, self.fields))


def _build_resource(
    cls: type[ConfigurableResource],  # type: ignore[type-arg]
    fields: dict[str, Any],
) -> ConfigurableResource:  # type: ignore[type-arg]
    return cls(**fields)


def build_resources(
    values: Mapping[str, Any],
    *,
    names: Mapping[str, str] | None = None,
    env_names: Mapping[str, str] | None = None,
) -> Flux2Resources:
    """Validate the flat `values` (unset ones keep their defaults) into the resources.

    `names` words errors the way the user wrote each setting (an environment variable,
    an attribute). `env_names` says which environment variable a secret's value came from;
    a secret without one is refused unless it holds nothing secret (a ledger URL with no
    password). Raises `SettingsError` with one line naming the setting.
    """
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} (choose from {', '.join(SETTINGS)})")
    names = dict(names or {})
    env_names = dict(env_names or {})
    given = {name: value for name, value in values.items() if value is not None}
    for name in SECRETS & set(given):
        if name not in env_names and _holds_secret(name, given[name]):
            why = "must come from" if name == "api_token" else "holds a password: set it from"
            raise SettingsError(
                f"{names.get(name, name)} {why} an environment variable (for example "
                f"{{{{ env.{SETTINGS[name].variable} }}}}), so Dagster's run storage never holds it"
            )

    storage = checked(Flux2Storage, given, names, env_names)
    runcomfy = checked(RunComfyResource, given, names, env_names)
    ledger = checked(LedgerResource, given, names, env_names, storage=storage)
    if not given.get("ledger_url"):
        ledger.effective_url  # noqa: B018 - an object-store output needs a shared ledger
    return Flux2Resources(runcomfy=runcomfy, ledger=ledger, storage=storage)


def _holds_secret(name: str, value: Any) -> bool:
    if name == "api_token":
        return bool(value)
    try:
        return make_url(str(value)).password is not None if "://" in str(value) else False
    except Exception:
        return True  # unparseable: assume the worst, never echo it
