"""The flux2 asset factory: prompt tables, edits, images, training dataset, checks, sensors.

`build_flux2_definitions` is the public entry point; `Flux2Keys` names everything it builds.
"""

from flux2_pipeline.assets.edits import CODE_VERSION, EDITS_RETRY_POLICY, edits_retry_policy
from flux2_pipeline.assets.factory import StepRetries, build_flux2_definitions
from flux2_pipeline.assets.images import ImagesConfig
from flux2_pipeline.assets.keys import DEFAULT_RESOURCE_KEYS, LEGACY_RESOURCE_KEYS, Flux2Keys
from flux2_pipeline.assets.prompts import register_input_files

__all__ = [
    "CODE_VERSION",
    "DEFAULT_RESOURCE_KEYS",
    "EDITS_RETRY_POLICY",
    "LEGACY_RESOURCE_KEYS",
    "Flux2Keys",
    "ImagesConfig",
    "StepRetries",
    "build_flux2_definitions",
    "edits_retry_policy",
    "register_input_files",
]
