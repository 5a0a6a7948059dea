"""Every setting (`CATALOGUE`: the resources' fields, `StepRetries`, `RunOptions`), and the
environment turned into them. This is the only place that reads the environment; secrets
become `EnvVar`s, so Dagster's run storage keeps `RUNCOMFY_API_TOKEN` and
`FLUX2_LEDGER_URL` by name only. `python -m flux2_pipeline.settings > docs/settings.md`.

Example::

    >>> settings = Settings.from_env({"FLUX2_MAX_CONCURRENCY": "16"})
    >>> settings.runcomfy.max_concurrency, Path(settings.storage.input_dir).name
    (16, 'prompts')
    >>> Settings.from_env({"FLUX2_MAX_CONCURRENCY": "lots"})
    Traceback (most recent call last):
    SettingsError: FLUX2_MAX_CONCURRENCY must be a whole number from 1 to 4096, got 'lots'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import Definitions
from pydantic import BaseModel, Field, field_validator

from flux2_pipeline.assets import StepRetries, build_flux2_definitions
from flux2_pipeline.resources import (
    SECRETS,
    SETTINGS,
    Flux2Resources,
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    SettingsError,
    build_resources,
)
from flux2_pipeline.resources.catalogue import checked, setting, settings_of
from flux2_pipeline.run_limits import (
    DEFAULT_PARALLEL_PARTITIONS,
    DEFAULT_PARTITIONS_PER_RUN,
    MOST_PARALLEL_PARTITIONS,
    PARALLEL_PARTITIONS_VARIABLE,
    PARTITIONS_PER_RUN_VARIABLE,
)

__all__ = ["CATALOGUE", "RunOptions", "Settings", "SettingsError", "settings_markdown"]


class RunOptions(BaseModel):
    """The settings no resource holds: how the command line runs partitions, and where."""

    dagster_home: Path | None = Field(
        default=None,
        description="Run history, partitions, event log (an absolute path to an existing "
        "folder); unset: $FLUX2_OUTPUT_DIR/.dagster for the command line "
        "(`~/.flux2-pipeline/dagster/<hash of the URL>` for an object-store output).",
        json_schema_extra=setting("DAGSTER_HOME", attribute=False),
    )
    parallel_partitions: int = Field(
        default=DEFAULT_PARALLEL_PARTITIONS,
        ge=1,
        le=MOST_PARALLEL_PARTITIONS,
        description="Dagster runs `flux2-pipeline materialize` runs at once (--parallel N); "
        "1 runs them one after another.",
        json_schema_extra=setting(PARALLEL_PARTITIONS_VARIABLE, attribute=False),
    )
    partitions_per_run: int = Field(
        default=DEFAULT_PARTITIONS_PER_RUN,
        ge=1,
        le=1000,
        description="Most partitions one run covers: in `flux2-pipeline materialize`, a "
        "multi_run backfill and a run of the file sensor; 1 gives every partition its own run.",
        json_schema_extra=setting(PARTITIONS_PER_RUN_VARIABLE),
    )

    @field_validator("dagster_home", mode="before")
    @classmethod
    def _existing_folder(cls, value: Any) -> Any:
        home = Path(value)
        if not home.is_absolute() or not home.is_dir():
            raise ValueError(f"must be an absolute path to an existing directory, got {value!r}")
        return home


CATALOGUE = {**SETTINGS, **settings_of(StepRetries, RunOptions)}
"""Every setting by its flat name (the Component attribute): the resources', then the rest."""


@dataclass(frozen=True)
class Settings:
    """The settings, checked: the resources, the step retries and the `RunOptions`."""

    resources: Flux2Resources
    step_retries: StepRetries = field(default_factory=StepRetries)
    dagster_home: Path | None = None
    parallel_partitions: int = DEFAULT_PARALLEL_PARTITIONS
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the RUNCOMFY_*, FLUX2_* and DAGSTER_HOME variables."""
        env = os.environ if env is None else env
        names = {name: item.variable for name, item in CATALOGUE.items() if item.variable}
        values = {name: _get(env, variable) for name, variable in names.items()}
        env_names = {name: names[name] for name in SECRETS if values[name]}
        return cls.from_values(values, names=names, env_names=env_names)

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Any],
        *,
        names: Mapping[str, str] | None = None,
        env_names: Mapping[str, str] | None = None,
    ) -> Settings:
        """Check settings by `CATALOGUE` name (None: the default); the rest as `build_resources`."""
        given = {name: value for name, value in values.items() if value is not None}
        resources = build_resources(
            {name: value for name, value in given.items() if name in SETTINGS},
            names=names,
            env_names=env_names,
        )
        step_retries = checked(StepRetries, given, names or {})
        return cls(resources, step_retries, **dict(checked(RunOptions, given, names or {})))

    @classmethod
    def of(
        cls,
        runcomfy: RunComfyResource,
        storage: Flux2Storage,
        ledger: LedgerResource | None = None,
        *,
        step_retries: StepRetries | None = None,
        **options: Any,
    ) -> Settings:
        """Settings from resources built in code (the demo, tests, notebooks); `options`
        are `RunOptions` fields, e.g. `dagster_home=Path(...)`."""
        resources = Flux2Resources(runcomfy, ledger or LedgerResource(storage=storage), storage)
        return cls(resources, step_retries or StepRetries(), **dict(RunOptions(**options)))

    @property
    def runcomfy(self) -> RunComfyResource:
        """The API resource (RUNCOMFY_*, FLUX2_MAX/ACCOUNT_CONCURRENCY, price)."""
        return self.resources.runcomfy

    @property
    def ledger(self) -> LedgerResource:
        """The ledger resource (FLUX2_LEDGER_URL, FLUX2_BUDGET_USD)."""
        return self.resources.ledger

    @property
    def storage(self) -> Flux2Storage:
        """The folders (FLUX2_INPUT_DIR, FLUX2_OUTPUT_DIR)."""
        return self.resources.storage

    def definitions(self) -> Definitions:
        """The project's `Definitions`: the factory with these resources and step retries."""
        return build_flux2_definitions(
            runcomfy=self.runcomfy,
            ledger=self.ledger,
            storage=self.storage,
            retry_policy=self.step_retries.policy(),
            partitions_per_run=self.partitions_per_run,
        )


def _get(env: Mapping[str, str], variable: str) -> str | None:
    raw = env.get(variable, "")
    if variable == "RUNCOMFY_API_TOKEN":
        return raw or None  # spaces around a token are an error, not something to strip
    return raw.strip() or None


def settings_markdown() -> str:
    """docs/settings.md: every setting of `CATALOGUE` in a table."""
    lines = [
        "# Settings\n\nEvery setting, generated by `python -m flux2_pipeline.settings > "
        "docs/settings.md` (a test keeps this page current). The command line reads the "
        "variables; a `Flux2EditsComponent` takes the attributes, which mean the same (its "
        "relative folders are under the project root; a secret is written "
        '`"{{ env.NAME }}"`). A bad value stops with one line naming the setting.\n\n'
        "| Variable | Component attribute | Type | Default | Meaning |\n"
        "| --- | --- | --- | --- | --- |"
    ]
    for item in CATALOGUE.values():
        cells = (
            f"`{item.variable}`" if item.variable else "(none)",
            f"`{item.name}`" if item.attribute else "(command line only)",
            item.rule,
            "unset" if item.default in (None, {}) else f"`{item.default}`",
            item.meaning + (" A secret: kept as an `EnvVar`." if item.secret else ""),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
