"""A RunComfy-compatible FLUX.2 [dev] edit API for offline development, demos and tests.

    >>> from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
    >>> with EmulatorServer(EmulatorConfig(port=0, latency=0.2)) as emulator:
    ...     print(emulator.base_url)  # point RUNCOMFY_BASE_URL here
    http://127.0.0.1:40123

`flux2-pipeline emulator` serves it in the foreground through `run_emulator`. It speaks
RunComfy's documented dialect unless `EmulatorConfig(dialect="seed")`.
"""

from flux2_pipeline.emulator.app import BALANCE_PATH, MODEL_ID, create_app
from flux2_pipeline.emulator.dialect import DIALECTS, ERROR_CODES
from flux2_pipeline.emulator.render import check_reference, render_edit, render_sample
from flux2_pipeline.emulator.server import EmulatorServer, run_emulator
from flux2_pipeline.emulator.state import (
    UNLIMITED_BALANCE_USD,
    Counters,
    EmulatorConfig,
    EmulatorState,
    Faults,
    Job,
)

__all__ = [
    "BALANCE_PATH",
    "DIALECTS",
    "ERROR_CODES",
    "MODEL_ID",
    "UNLIMITED_BALANCE_USD",
    "Counters",
    "EmulatorConfig",
    "EmulatorServer",
    "EmulatorState",
    "Faults",
    "Job",
    "check_reference",
    "create_app",
    "render_edit",
    "render_sample",
    "run_emulator",
]
