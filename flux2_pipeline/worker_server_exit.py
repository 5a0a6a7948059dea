"""Ends the worker server at once when the command that started it exits.

The worker server (see `flux2_pipeline.workers`) has imported Dagster, pandas, pyarrow
and the rest, and an ordinary interpreter exit tears all of that down object by object:
0.6 s of CPU, after the command itself is gone. The server shares the command's stdout
and stderr, so whoever reads the command's output through a pipe (`| tee`, a CI log,
`subprocess.run(..., capture_output=True)`) waited those 0.6 s for the end of the output.
The server has nothing to flush or clean up (the command owns the socket's folder), so it
may skip the teardown.

Importing this module has an effect only in the worker server, which imports it first
thing (`workers.PRELOAD`): there it registers an exit handler that ends the process with
`os._exit` once the server's loop is over. Nothing else imports it; anywhere else (the
server is recognised by its command line, `python -c "from multiprocessing.forkserver
import main; ..."`) importing it does nothing.

Example::

    context.set_forkserver_preload(["flux2_pipeline.worker_server_exit", ...])
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys


def is_worker_server(argv: list[str], modules: dict[str, object]) -> bool:
    """Whether this interpreter is multiprocessing's fork server.

    >>> is_worker_server(["-c"], {"multiprocessing.forkserver": object()})
    True
    >>> is_worker_server(["/usr/bin/flux2-pipeline", "materialize"], {})
    False
    """
    return argv[:1] == ["-c"] and "multiprocessing.forkserver" in modules


def exit_now() -> None:
    """Flush what this process may have printed, then end it without any teardown."""
    for stream in (sys.stdout, sys.stderr):
        # A stream closed or replaced has nothing left to keep.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(0)


if is_worker_server(sys.argv, dict(sys.modules)):
    atexit.register(exit_now)
