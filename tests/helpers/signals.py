"""Signal dispositions the test process needs, whatever started it.

Example:
    >>> keep_sigterm_deliverable()  # the root conftest calls it once at import
"""

from __future__ import annotations

import signal


def keep_sigterm_deliverable() -> None:
    """Make SIGINT interrupt this process as at a terminal, if it was started ignoring it.

    A pytest started from a script in the background (or by some CI runners) ignores SIGINT,
    and Dagster's in-process runs copy SIGINT's handler to SIGTERM when they end: from the
    first run on, SIGTERM is ignored too, and so is it in every process a test spawns after
    it. `multiprocessing.Pool.terminate()` then waits forever for workers that do not die:
    a round of `make test-under-load` hung so in the ledger's claim tests.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
