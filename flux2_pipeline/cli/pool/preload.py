"""What the worker server does first; imported by the server alone (`server.PRELOAD`).

In the server, importing this module imports `server.MODULES` with the garbage collector
off and freezes what they built (the collections an import of Dagster sets off cost 0.3 s
for nothing, and the workers fork from that frozen state), then makes the server end with
`os._exit`: an ordinary exit tore Dagster down object by object and kept whoever read
the command's output through a pipe waiting 0.6 s more. Imported anywhere else, it does
nothing.

Example::

    context.set_forkserver_preload(["flux2_pipeline.cli.pool.preload"])
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import sys
from types import FrameType

from flux2_pipeline.cli.pool.server import MODULES, exit_now


def imported_by_fork_server() -> bool:
    """Whether the fork server's preload loop is importing this module right now.

    >>> imported_by_fork_server()
    False
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "main"
            and frame.f_globals.get("__name__") == "multiprocessing.forkserver"
        ):
            return True
        frame = frame.f_back
    return False


if imported_by_fork_server():
    atexit.register(exit_now)
    gc.disable()
    try:
        for name in MODULES:
            with contextlib.suppress(ImportError):  # as the server itself would skip it
                importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()
