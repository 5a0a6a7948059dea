"""Ledger test helpers: an intent written without the claim rules, and the SELECTs a call sends.

Example:
    >>> submission = record_row_intent(ledger, "r1")
    >>> with selects_sent(ledger) as selects:
    ...     ledger.lookup(keys)
    >>> len(selects)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from flux2_pipeline.ledger import Ledger, Submission, make_row_key


def record_row_intent(ledger: Ledger, row_id: str = "r1", partition: str = "p1") -> Submission:
    """The intent of row `row_id` (input hash `hash-<row_id>`), recorded directly."""
    key = make_row_key(partition, row_id, "hash-" + row_id)
    return ledger.record_intent(key, partition, row_id, "hash-" + row_id)


@contextmanager
def selects_sent(ledger: Ledger) -> Iterator[list[str]]:
    """The SELECT statements the ledger's engine sends inside the block, filled as they go."""
    selects: list[str] = []

    def count(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT"):
            selects.append(args[2])

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        yield selects
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)
