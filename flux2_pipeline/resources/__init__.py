"""Dagster resources: the RunComfy API, the request ledger, and storage locations."""

from flux2_pipeline.resources.ledger import LedgerResource
from flux2_pipeline.resources.runcomfy import RunComfyResource
from flux2_pipeline.resources.storage import Flux2Storage

__all__ = ["Flux2Storage", "LedgerResource", "RunComfyResource"]
