"""How the worker server starts and ends; imported by the server alone, first thing.

The worker server (see `flux2_pipeline.cli.pool.server`) imports what a run needs once,
then forks a worker for each run. This module is the one name in its preload list
(`server.PRELOAD`); importing it in the server:

- imports `server.MODULES` with the garbage collector off, then freezes what they built
  and turns the collector back on: an import of Dagster allocates so many objects that
  the collections it sets off cost 0.3 s of the 1.5 s, for nothing (none of it is
  garbage). The workers start from that frozen state, so their own collections never
  walk it either;
- registers an exit handler that ends the server with `os._exit` once the command has
  gone. The server shares the command's stdout and stderr, and an ordinary exit tore
  down Dagster, pandas and pyarrow object by object: whoever read the command's output
  through a pipe (`| tee`, a CI log, `subprocess.run(..., capture_output=True)`) waited
  0.6 s more for its end. The server has nothing to flush or clean up (the command owns
  the socket's folder).

Imported anywhere else (anything but the server's preload loop, in
`multiprocessing.forkserver.main`), it does nothing.

Example::

    context.set_forkserver_preload(["flux2_pipeline.cli.pool.preload"])
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import sys
from collections.abc import Iterable
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


def import_frozen(names: Iterable[str]) -> None:
    """Import `names` with the collector off, then freeze what they built.

    A name that does not import is skipped, as the server itself would skip it.
    """
    gc.disable()
    try:
        for name in names:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


if imported_by_fork_server():
    atexit.register(exit_now)
    import_frozen(MODULES)
