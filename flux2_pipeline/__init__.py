"""flux2-pipeline: FLUX.2 [dev] image edits at scale from Dagster.

The public API, loaded on first use so that `import flux2_pipeline.runcomfy` (or the
ledger, batch, media, dataset layers) never imports Dagster::

    from flux2_pipeline import build_flux2_definitions, Flux2EditsComponent
    from flux2_pipeline import RunComfyResource, LedgerResource, Flux2Storage
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flux2_pipeline.assets import Flux2Keys, StepRetries, build_flux2_definitions
    from flux2_pipeline.component import Flux2EditsComponent
    from flux2_pipeline.resources import (
        Flux2Storage,
        LedgerResource,
        RunComfyResource,
        SettingsError,
        build_resources,
    )
    from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest

_EXPORTS = {
    "AsyncRunComfyClient": "flux2_pipeline.runcomfy",
    "EditRequest": "flux2_pipeline.runcomfy",
    "Flux2EditsComponent": "flux2_pipeline.component",
    "Flux2Keys": "flux2_pipeline.assets",
    "Flux2Storage": "flux2_pipeline.resources",
    "LedgerResource": "flux2_pipeline.resources",
    "RunComfyResource": "flux2_pipeline.resources",
    "SettingsError": "flux2_pipeline.resources",
    "StepRetries": "flux2_pipeline.assets",
    "build_flux2_definitions": "flux2_pipeline.assets",
    "build_resources": "flux2_pipeline.resources",
}

__all__ = [
    "AsyncRunComfyClient",
    "EditRequest",
    "Flux2EditsComponent",
    "Flux2Keys",
    "Flux2Storage",
    "LedgerResource",
    "RunComfyResource",
    "SettingsError",
    "StepRetries",
    "build_flux2_definitions",
    "build_resources",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flux2_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
