"""Dagster resources: the RunComfy API, the request ledger, and storage locations.

They are the pipeline's whole configuration: every setting is a described field, secrets
are set through `EnvVar`, and `build_resources` validates a flat set of settings into all
three at once with one-line errors.
"""

from flux2_pipeline.resources.bundle import SECRETS, SETTINGS, Flux2Resources, build_resources
from flux2_pipeline.resources.errors import SettingsError, settings_error
from flux2_pipeline.resources.ledger import REMOTE_LEDGER_REQUIRED, LedgerResource
from flux2_pipeline.resources.runcomfy import (
    RunComfyResource,
    RunInterrupted,
    check_parameter_defaults,
    is_loopback,
)
from flux2_pipeline.resources.storage import (
    Flux2Storage,
    InputScan,
    partition_key_problem,
)

__all__ = [
    "REMOTE_LEDGER_REQUIRED",
    "SECRETS",
    "SETTINGS",
    "Flux2Resources",
    "Flux2Storage",
    "InputScan",
    "LedgerResource",
    "RunComfyResource",
    "RunInterrupted",
    "SettingsError",
    "build_resources",
    "check_parameter_defaults",
    "is_loopback",
    "partition_key_problem",
    "settings_error",
]
