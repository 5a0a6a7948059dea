"""The environment variables of CONTRACT.md, turned into the pipeline's resources.

This is the only place that reads them; the resources hold the rules (see
`flux2_pipeline.resources`) and the secrets become `EnvVar`s, so Dagster's run storage
keeps `RUNCOMFY_API_TOKEN` and `FLUX2_LEDGER_URL` by name only.

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

from dagster import Definitions
from pydantic import ValidationError

from flux2_pipeline.assets import StepRetries, build_flux2_definitions
from flux2_pipeline.assets.ranges import MAX_PARTITIONS_PER_RUN
from flux2_pipeline.resources import (
    SECRETS,
    Flux2Resources,
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    SettingsError,
    build_resources,
    settings_error,
)
from flux2_pipeline.run_limits import (
    DEFAULT_PARALLEL_PARTITIONS,
    DEFAULT_PARTITIONS_PER_RUN,
    PARALLEL_PARTITIONS_VARIABLE,
    PARTITIONS_PER_RUN_VARIABLE,
)

ENVIRONMENT: dict[str, str] = {
    "api_token": "RUNCOMFY_API_TOKEN",
    "base_url": "RUNCOMFY_BASE_URL",
    "account_base_url": "RUNCOMFY_ACCOUNT_BASE_URL",
    "balance_check": "FLUX2_BALANCE_CHECK",
    "input_dir": "FLUX2_INPUT_DIR",
    "output_dir": "FLUX2_OUTPUT_DIR",
    "max_concurrency": "FLUX2_MAX_CONCURRENCY",
    "ledger_url": "FLUX2_LEDGER_URL",
    "account_concurrency": "FLUX2_ACCOUNT_CONCURRENCY",
    "budget_usd": "FLUX2_BUDGET_USD",
    "price_per_image_usd": "FLUX2_PRICE_PER_IMAGE_USD",
    "claim_lease_seconds": "FLUX2_CLAIM_LEASE_SECONDS",
    "max_decode_pixels": "FLUX2_MAX_DECODE_PIXELS",
}
"""Each resource setting and the variable that sets it."""

STEP_RETRY_ENVIRONMENT = {"retries": "FLUX2_STEP_RETRIES", "delay": "FLUX2_STEP_RETRY_DELAY"}

MAX_PARALLEL_PARTITIONS = 64

__all__ = ["ENVIRONMENT", "Settings", "SettingsError"]


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
        values = {name: _get(env, variable) for name, variable in ENVIRONMENT.items()}
        resources = build_resources(
            {name: value for name, value in values.items() if value is not None},
            names=ENVIRONMENT,
            env_names={name: ENVIRONMENT[name] for name in SECRETS if values[name]},
        )
        retry_values = {
            name: value
            for name, variable in STEP_RETRY_ENVIRONMENT.items()
            if (value := _get(env, variable)) is not None
        }
        try:
            step_retries = StepRetries(**retry_values)
        except ValidationError as exc:
            raise settings_error(exc, StepRetries, STEP_RETRY_ENVIRONMENT) from None
        return cls(
            resources,
            step_retries,
            _dagster_home(env),
            _whole_number(
                env,
                PARALLEL_PARTITIONS_VARIABLE,
                DEFAULT_PARALLEL_PARTITIONS,
                MAX_PARALLEL_PARTITIONS,
            ),
            _whole_number(
                env, PARTITIONS_PER_RUN_VARIABLE, DEFAULT_PARTITIONS_PER_RUN, MAX_PARTITIONS_PER_RUN
            ),
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


def _whole_number(env: Mapping[str, str], variable: str, default: int, most: int) -> int:
    raw = _get(env, variable)
    if raw is None:
        return default
    value = int(raw) if raw.isdecimal() else 0
    if not 1 <= value <= most:
        raise SettingsError(f"{variable} must be a whole number from 1 to {most}, got {raw!r}")
    return value


def _dagster_home(env: Mapping[str, str]) -> Path | None:
    configured = env.get("DAGSTER_HOME", "").strip()
    if not configured:
        return None
    home = Path(configured)
    if not home.is_absolute() or not home.is_dir():
        raise SettingsError(
            f"DAGSTER_HOME must be an absolute path to an existing directory, got {configured!r}"
        )
    return home
