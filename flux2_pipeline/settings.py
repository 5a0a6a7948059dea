"""Every setting of the pipeline, and the environment turned into its resources.

`CATALOGUE` lists them all, each declared once on the pydantic field that holds it (see
`flux2_pipeline.resources.catalogue`): the resources' fields, `StepRetries`, and
`RunOptions` for what only the command line reads. This is the only place that reads the
environment; the secrets become `EnvVar`s, so Dagster's run storage keeps
`RUNCOMFY_API_TOKEN` and `FLUX2_LEDGER_URL` by name only. `python -m
flux2_pipeline.settings > docs/settings.md` writes the table of every setting.

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
from typing import Any, TypeVar

from dagster import Definitions
from pydantic import BaseModel, Field, ValidationError, field_validator

from flux2_pipeline.assets import StepRetries, build_flux2_definitions
from flux2_pipeline.assets.ranges import DEFAULT_PARTITIONS_PER_RUN, MAX_PARTITIONS_PER_RUN
from flux2_pipeline.resources import (
    SETTINGS,
    Flux2Resources,
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    SettingsError,
    build_resources,
    markdown_table,
    setting,
    settings_error,
    settings_of,
)

DEFAULT_PARALLEL_PARTITIONS = 4

__all__ = ["CATALOGUE", "RunOptions", "Settings", "SettingsError", "settings_markdown"]

M = TypeVar("M", bound=BaseModel)


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
        le=64,
        description="Dagster runs `flux2-pipeline materialize` runs at once (--parallel N); "
        "1 runs them one after another.",
        json_schema_extra=setting("FLUX2_PARALLEL_PARTITIONS", attribute=False),
    )
    partitions_per_run: int = Field(
        default=DEFAULT_PARTITIONS_PER_RUN,
        ge=1,
        le=MAX_PARTITIONS_PER_RUN,
        description="Most partitions one run covers: in `flux2-pipeline materialize`, a "
        "multi_run backfill and a run of the file sensor; 1 gives every partition its own run.",
        json_schema_extra=setting("FLUX2_PARTITIONS_PER_RUN"),
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
    """The environment, translated: the resources, the step retries and DAGSTER_HOME.

    `parallel_partitions` (FLUX2_PARALLEL_PARTITIONS) is how many Dagster runs
    `flux2-pipeline materialize` runs at once; `partitions_per_run`
    (FLUX2_PARTITIONS_PER_RUN) is the most partitions one run covers, there and in the
    UI's backfills.
    """

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
        secrets = {name: names[name] for name, item in CATALOGUE.items() if item.secret}
        env_names = {name: variable for name, variable in secrets.items() if values[name]}
        return cls.from_values(values, names=names, env_names=env_names)

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Any],
        *,
        names: Mapping[str, str] | None = None,
        env_names: Mapping[str, str] | None = None,
    ) -> Settings:
        """Check flat settings (`CATALOGUE`'s names; None or absent: the default).

        `names` and `env_names` are as in `build_resources`; a bad value raises
        `SettingsError`, one line naming the setting as `names` spells it.
        """
        given = {name: value for name, value in values.items() if value is not None}
        unknown = sorted(set(given) - set(CATALOGUE))
        if unknown:
            raise SettingsError(
                f"unknown setting {unknown[0]!r} (choose from {', '.join(CATALOGUE)})"
            )
        resources = build_resources(
            {name: value for name, value in given.items() if name in SETTINGS},
            names=names,
            env_names=env_names,
        )
        step_retries = _checked(StepRetries, given, names or {})
        options = _checked(RunOptions, given, names or {})
        return cls(
            resources,
            step_retries,
            options.dagster_home,
            options.parallel_partitions,
            options.partitions_per_run,
        )

    @classmethod
    def of(
        cls,
        runcomfy: RunComfyResource,
        storage: Flux2Storage,
        ledger: LedgerResource | None = None,
        *,
        step_retries: StepRetries | None = None,
        dagster_home: Path | None = None,
        parallel_partitions: int = DEFAULT_PARALLEL_PARTITIONS,
        partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN,
    ) -> Settings:
        """Settings from resources built in code (the demo, tests, notebooks)."""
        return cls(
            Flux2Resources(runcomfy, ledger or LedgerResource(storage=storage), storage),
            step_retries or StepRetries(),
            dagster_home,
            parallel_partitions,
            partitions_per_run,
        )

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


def _checked(model: type[M], given: Mapping[str, Any], names: Mapping[str, str]) -> M:
    own = [item for item in CATALOGUE.values() if item.model is model]
    try:
        return model(**{item.field: given[item.name] for item in own if item.name in given})
    except ValidationError as exc:
        labels = {item.field: names.get(item.name, item.name) for item in own}
        raise settings_error(exc, model, labels) from None


def settings_markdown() -> str:
    """docs/settings.md: every setting of `CATALOGUE` as a table."""
    return (
        "# Settings\n\n"
        "Every setting of flux2-pipeline, generated from the fields that declare them "
        "(`python -m flux2_pipeline.settings > docs/settings.md`). The command line reads "
        "the environment variables; a `Flux2EditsComponent` in a `defs.yaml` takes the "
        "attributes, which mean the same (relative folders are relative to the project "
        'root; a secret is written `"{{ env.NAME }}"` so only the name is stored). A bad '
        "value stops the command, or the code location's load, with one line naming the "
        "setting.\n\n" + markdown_table(CATALOGUE.values())
    )


if __name__ == "__main__":
    print(settings_markdown(), end="")
