"""Dagster assets: the prompt tables and their sensor, the edits, images, dataset, checks."""

from flux2_pipeline.assets.checks import EDITS_CHECKS
from flux2_pipeline.assets.dataset import flux2_training_dataset
from flux2_pipeline.assets.edits import (
    CODE_VERSION,
    EDITS_RETRY_POLICY,
    build_edits_asset,
    edits_retry_policy,
    flux2_edits,
)
from flux2_pipeline.assets.image_checks import IMAGES_CHECKS
from flux2_pipeline.assets.images import ImagesConfig, build_images_asset, flux2_images
from flux2_pipeline.assets.prompts import (
    PARTITIONS_NAME,
    flux2_prompt_files_sensor,
    flux2_prompt_tables,
    prompt_table_partitions,
)

__all__ = [
    "CODE_VERSION",
    "EDITS_CHECKS",
    "EDITS_RETRY_POLICY",
    "IMAGES_CHECKS",
    "PARTITIONS_NAME",
    "ImagesConfig",
    "build_edits_asset",
    "build_images_asset",
    "edits_retry_policy",
    "flux2_edits",
    "flux2_images",
    "flux2_prompt_files_sensor",
    "flux2_prompt_tables",
    "flux2_training_dataset",
    "prompt_table_partitions",
]
