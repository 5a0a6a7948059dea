"""The one `Definitions` object: assets, checks, sensor, job and resources from the environment.

`dagster dev -w workspace.yaml` loads `defs` from here; so does `flux2-pipeline materialize`.

Example::

    from flux2_pipeline.definitions import build_definitions
    defs = build_definitions(Settings.from_env({"FLUX2_INPUT_DIR": "my/prompts"}))
"""

from __future__ import annotations

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from flux2_pipeline.assets import (
    EDITS_CHECKS,
    IMAGES_CHECKS,
    build_edits_asset,
    build_images_asset,
    edits_retry_policy,
    flux2_edits,
    flux2_prompt_files_sensor,
    flux2_prompt_tables,
    flux2_training_dataset,
)
from flux2_pipeline.resources import Flux2Storage, LedgerResource, RunComfyResource
from flux2_pipeline.settings import Settings

EDITS_JOB_NAME = "flux2_edits_job"

flux2_edits_job = define_asset_job(
    EDITS_JOB_NAME,
    selection=AssetSelection.assets(flux2_edits),
    description="Materialize flux2_edits (and its checks) for one prompt-table partition.",
)


def build_resources(settings: Settings) -> dict[str, object]:
    """The resources, configured from `settings`; the token stays an `EnvVar` reference."""
    token = EnvVar("RUNCOMFY_API_TOKEN") if settings.api_token else None
    return {
        "runcomfy": RunComfyResource(
            api_token=token,
            base_url=settings.base_url,
            max_concurrency=settings.max_concurrency,
        ),
        "ledger": LedgerResource(
            url=settings.ledger_url,
            output_dir=str(settings.output_dir),
            lease_seconds=settings.claim_lease_seconds,
            account_concurrency=settings.account_concurrency,
            budget_usd=settings.budget_usd,
            price_per_image_usd=settings.price_per_image_usd,
        ),
        "storage": Flux2Storage(
            input_dir=str(settings.input_dir), output_dir=str(settings.output_dir)
        ),
    }


def build_definitions(settings: Settings | None = None) -> Definitions:
    """All of flux2-pipeline as Dagster `Definitions`, configured from the environment."""
    settings = settings or Settings.from_env()
    policy = edits_retry_policy(settings.step_retries, settings.step_retry_delay)
    return Definitions(
        assets=[
            flux2_prompt_tables,
            build_edits_asset(policy),
            build_images_asset(policy),
            flux2_training_dataset,
        ],
        asset_checks=[*EDITS_CHECKS, *IMAGES_CHECKS],
        sensors=[flux2_prompt_files_sensor],
        jobs=[flux2_edits_job],
        resources=build_resources(settings),
    )


defs = build_definitions()
