"""Dagster resources: the RunComfy API, the request ledger, and storage locations."""

from flux2_pipeline.resources.ledger import LedgerResource
from flux2_pipeline.resources.runcomfy import STOP_REQUESTED, RunComfyResource, RunInterrupted
from flux2_pipeline.resources.storage import Flux2Storage

__all__ = [
    "STOP_REQUESTED",
    "Flux2Storage",
    "LedgerResource",
    "RunComfyResource",
    "RunInterrupted",
]
