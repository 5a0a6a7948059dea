"""Dagster assets: the prompt tables and their sensor, the edits, and their checks."""

from flux2_pipeline.assets.checks import EDITS_CHECKS
from flux2_pipeline.assets.edits import (
    CODE_VERSION,
    EDITS_RETRY_POLICY,
    build_edits_asset,
    edits_retry_policy,
    flux2_edits,
)
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
    "PARTITIONS_NAME",
    "build_edits_asset",
    "edits_retry_policy",
    "flux2_edits",
    "flux2_prompt_files_sensor",
    "flux2_prompt_tables",
    "prompt_table_partitions",
]
