"""`build_flux2_definitions`: the whole flux2 pipeline as Dagster `Definitions`, from one call.

Like dagster-sling's `sling_assets`, the factory owns every name: give it where the prompt
tables are (the resources), and optionally a key prefix, a group, a step retry policy and a
pool; it returns the prompt tables, `flux2_edits`, `flux2_images`, `flux2_training_dataset`,
their checks, the input-folder sensor, the automation sensor and the per-partition job.

Example::

    from dagster import EnvVar
    from flux2_pipeline import Flux2Storage, LedgerResource, RunComfyResource
    from flux2_pipeline import build_flux2_definitions

    storage = Flux2Storage(input_dir="data/prompts", output_dir="data/output")
    defs = build_flux2_definitions(
        runcomfy=RunComfyResource(api_token=EnvVar("RUNCOMFY_API_TOKEN")),
        ledger=LedgerResource(url=EnvVar("FLUX2_LEDGER_URL"), storage=storage),
        storage=storage,
        key_prefix="team_a",
        pool="runcomfy_account",
    )
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from dagster import (
    AssetSelection,
    AssetSpec,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    DynamicPartitionsDefinition,
    RetryPolicy,
    define_asset_job,
)
from pydantic import BaseModel, Field

from flux2_pipeline.assets.dataset import build_dataset_asset
from flux2_pipeline.assets.edits import (
    EDITS_RETRY_POLICY,
    PROGRESS_SECONDS,
    build_edits_asset,
    edits_retry_policy,
)
from flux2_pipeline.assets.hooks import ExecuteHook
from flux2_pipeline.assets.image_checks import build_images_checks
from flux2_pipeline.assets.images import build_images_asset
from flux2_pipeline.assets.keys import ASSET_NAMES, Flux2Keys
from flux2_pipeline.assets.observe import build_observation_sensor
from flux2_pipeline.assets.prompts import build_prompt_files_sensor, build_prompt_tables
from flux2_pipeline.assets.ranges import DEFAULT_PARTITIONS_PER_RUN
from flux2_pipeline.resources import (
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    SettingsError,
)
from flux2_pipeline.resources.catalogue import setting


class StepRetries(BaseModel):
    """How a failed partition step is re-run (FLUX2_STEP_RETRIES, FLUX2_STEP_RETRY_DELAY).

    >>> StepRetries(retries=0).policy() is None
    True
    """

    retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Times a failed partition step is re-run; the ledger keeps completed "
        "rows from being paid again.",
        json_schema_extra=setting("FLUX2_STEP_RETRIES", name="step_retries"),
    )
    delay: float = Field(
        default=10.0,
        ge=0,
        le=86400,
        description="Seconds before the first re-run, growing exponentially, with jitter.",
        json_schema_extra=setting("FLUX2_STEP_RETRY_DELAY", name="step_retry_delay"),
    )

    def policy(self) -> RetryPolicy | None:
        """The step `RetryPolicy` (exponential backoff with jitter), None for no re-runs."""
        return edits_retry_policy(self.retries, self.delay)


def build_flux2_definitions(
    *,
    runcomfy: RunComfyResource | None = None,
    ledger: LedgerResource | None = None,
    storage: Flux2Storage | None = None,
    key_prefix: str | Sequence[str] | None = None,
    group_name: str = "flux2",
    retry_policy: RetryPolicy | None = EDITS_RETRY_POLICY,
    pool: str | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN,
    resource_keys: Mapping[str, str] | None = None,
    single_run_backfills: bool = False,
    asset_spec: Callable[[str, AssetSpec], AssetSpec] | None = None,
    execute: ExecuteHook | None = None,
) -> Definitions:
    """The flux2 assets, checks, sensors and job; with the resources bound when given.

    Resources left out must be supplied by the `Definitions` this is merged into, under
    the keys `Flux2Keys.from_prefix(key_prefix).resource("runcomfy" | "ledger" | "storage")`:
    `flux2_runcomfy`, `flux2_ledger`, `flux2_storage` by default, namespaced so that they
    never collide with a project's own; `resource_keys` chooses others by role
    (`resource_keys=LEGACY_RESOURCE_KEYS` keeps the plain `runcomfy`, `ledger`, `storage`
    of earlier versions, for code that binds them itself).
    `pool` is the Dagster concurrency pool of `flux2_edits` steps (limit it with
    `dagster instance concurrency set <pool> N`); `progress_seconds` is how often a running
    step records an `AssetObservation` with rows done, failed and spend so far;
    `partitions_per_run` is the most partitions one run of a backfill covers
    (`BackfillPolicy.multi_run`; `flux2-pipeline materialize` groups partitions the same way);
    `single_run_backfills` makes a backfill one run over its whole range instead
    (`BackfillPolicy.single_run`, which `dg launch --partition-range` requires).

    `asset_spec(name, spec)` returns the spec each asset should have, from the one the
    factory made (`name` is `flux2_prompt_tables`, `flux2_edits`, `flux2_images` or
    `flux2_training_dataset`): a new key, group, owners, tags, kinds, description,
    metadata, freshness policy or automation condition. Keys are settled first, so every
    dependency, check and lineage entry follows a renamed asset. `execute(name, context,
    step)` runs each materializing step; the default is `yield from step()`, and a hook
    may log around it, add events, or refuse to run.
    """
    keys = plain = Flux2Keys.from_prefix(key_prefix, resource_keys)
    if asset_spec is not None:
        keys = plain.with_asset_keys(
            {name: asset_spec(name, AssetSpec(keys.asset(name))).key for name in ASSET_NAMES}
        )
    partitions_def = DynamicPartitionsDefinition(name=keys.partitions_name)
    edits = build_edits_asset(
        keys,
        partitions_def,
        group_name=group_name,
        retry_policy=retry_policy,
        pool=pool,
        progress_seconds=progress_seconds,
        partitions_per_run=partitions_per_run,
        single_run_backfills=single_run_backfills,
        execute=execute,
    )
    images = build_images_asset(
        keys,
        partitions_def,
        group_name=group_name,
        retry_policy=retry_policy,
        partitions_per_run=partitions_per_run,
        single_run_backfills=single_run_backfills,
        execute=execute,
    )
    dataset = build_dataset_asset(keys, group_name=group_name, execute=execute)
    resources = {
        keys.resource(name): resource
        for name, resource in (("runcomfy", runcomfy), ("ledger", ledger), ("storage", storage))
        if resource is not None
    }
    defs = Definitions(
        assets=[build_prompt_tables(keys, partitions_def, group_name), edits, images, dataset],
        asset_checks=build_images_checks(keys, partitions_def),
        sensors=[
            build_prompt_files_sensor(keys, partitions_def, [keys.edits], partitions_per_run),
            build_observation_sensor(keys, partitions_def),
            AutomationConditionSensorDefinition(
                keys.automation_sensor_name,
                target=AssetSelection.assets(keys.images, keys.training_dataset),
                default_status=DefaultSensorStatus.RUNNING,
                description="Materializes flux2_images after each flux2_edits partition, and "
                "the training dataset after any partition's images.",
            ),
        ],
        jobs=[
            define_asset_job(
                keys.job_name,
                selection=AssetSelection.assets(keys.edits),
                description="Materialize flux2_edits (and its checks) for one partition.",
            )
        ],
        resources=resources,
    )
    if asset_spec is None:
        return defs
    names = {keys.asset(name): name for name in ASSET_NAMES}
    return defs.map_asset_specs(
        func=lambda spec: _translated(asset_spec, names[spec.key], spec, plain)
    )


def _translated(
    asset_spec: Callable[[str, AssetSpec], AssetSpec],
    name: str,
    spec: AssetSpec,
    plain: Flux2Keys,
) -> AssetSpec:
    """The hook's spec for a built asset: given under the key the factory would have used
    (as on the first call), it must give the key it gave then."""
    final = spec.key
    translated = asset_spec(name, spec.replace_attributes(key=plain.asset(name)))
    if translated.key != final:
        raise SettingsError(
            f"{name}: the asset spec hook gave the key {translated.key.to_user_string()!r}, "
            f"then {final.to_user_string()!r}: it must name each asset the same way every time"
        )
    return translated
