"""Row ids: the `id` column, or one derived from the row's content; one namespace for both.

A given id and a derived id are the same kind of thing (the ledger keys paid jobs on
them), so they share one namespace: a later row whose *given* id is already taken is
invalid; a later row with *no* id whose derived id is taken gets the next numbered
derived id (`h-<digest>-2`, `-3`, ...). Rows are assigned in file order, so the same file
always gives the same ids and a re-run pays for nothing new.

Taken ids live in a temporary SQLite file (a primary-key index, written once per batch),
not in process memory, so a table of any length is checked exactly in constant memory.

Example::

    with RowIdRegistry() as ids:
        for row_id, problem in ids.assign_batch([{"id": 7}, {"prompt": "p"}]):
            print(row_id, problem)  # "7" None, then "h-…" None
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
from collections.abc import Iterable, Sequence
from typing import Any

from flux2_pipeline.paths import ScratchDatabase

# Beyond 2**53 a float no longer holds every integer: such an id may have lost digits.
_EXACT_FLOAT_INTEGERS = 2**53
_LOOKUP_CHUNK = 500
_shown = reprlib.Repr()  # error messages quote values, never a whole huge one
_shown.maxstring = _shown.maxother = 60


def given_id(raw: Any) -> tuple[str | None, str | None]:
    """The row's own id as text, or the reason it is unusable; `(None, None)` when absent.

    Integral floats are integer ids (pandas turns an integer column with a missing value
    into floats): `1.0` is `"1"`.

    Example::

        >>> given_id(1.0), given_id(" a "), given_id(None)
        (('1', None), ('a', None), (None, None))
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None, None
    if isinstance(raw, float):
        if not raw.is_integer():
            return None, f"id: must be a string or an integer, got the number {_shown.repr(raw)}"
        if abs(raw) > _EXACT_FLOAT_INTEGERS:
            return None, (
                f"id: a float id above 2**53 may have lost digits, got {raw!r}; "
                "store ids as integers or strings"
            )
        return str(int(raw)), None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        return None, f"id: must be a string or an integer, got {_shown.repr(raw)}"
    text = str(raw).strip()
    if not text:
        return None, "id: must not be blank"
    return text, None


def content_key(record: dict[str, Any], columns: Iterable[str]) -> str:
    """The row's content (every known column but `id`) as canonical JSON."""
    content = {key: record.get(key) for key in sorted(columns) if key != "id"}
    return json.dumps(content, sort_keys=True, default=str, separators=(",", ":"))


def derived_base(record: dict[str, Any], columns: Iterable[str]) -> str:
    """`h-<16 hex>`: the first derived id for this content.

    Content, not position: inserting a row must not change (and re-bill) the others.
    """
    digest = hashlib.sha256(content_key(record, columns).encode()).hexdigest()[:16]
    return f"h-{digest}"


def numbered(base: str, occurrence: int) -> str:
    """The derived id of the `occurrence`-th (0-based) row with this content."""
    return base if occurrence == 0 else f"{base}-{occurrence + 1}"


class RowIdRegistry(ScratchDatabase):
    """Assigns unique row ids in file order, exactly, with taken ids kept on disk.

    The ids live in a `ScratchDatabase` (never synced: it is rebuilt from the file on
    every run; deleted by `close()`) whose page cache is bounded (`cache_kib`), so memory
    does not grow with the number of ids.
    """

    def __init__(self, columns: Iterable[str], cache_kib: int = 4096) -> None:
        self._columns = tuple(sorted(set(columns) - {"id"}))
        # next_occurrence: for a derived base id, how many rows with its content have been
        # numbered so far; NULL for every other id.
        super().__init__(
            "ids",
            "CREATE TABLE taken (id TEXT PRIMARY KEY, next_occurrence INTEGER) WITHOUT ROWID",
            cache_kib,
        )

    def assign_batch(self, records: Sequence[dict[str, Any]]) -> list[tuple[str, str | None]]:
        """For each record in order: `(row_id, None)`, or `(row_id, reason)` if invalid.

        An invalid row's `row_id` is what it was given (so a person can find it), or its
        derived base when its id is unusable; invalid rows take no id from the others.
        """
        wanted: list[tuple[str | None, str | None, str | None]] = []
        for record in records:
            text, problem = given_id(record.get("id"))
            base = None if text is not None else derived_base(record, self._columns)
            wanted.append((text, base, problem))
        keys = {text or base for text, base, problem in wanted if problem is None}
        known = self._lookup(key for key in keys if key is not None)
        # Ids taken in this batch: id -> next_occurrence, written back in one go.
        batch: dict[str, int | None] = {}
        assigned: list[tuple[str, str | None]] = []
        for text, base, problem in wanted:
            if problem is not None:
                assigned.append((base or "", problem))
            elif text is not None:
                if text in batch or text in known:
                    assigned.append((text, _duplicate(text)))
                else:
                    batch[text] = None
                    assigned.append((text, None))
            else:
                assert base is not None
                assigned.append((self._take_derived(base, batch, known), None))
        self.write_many(
            "INSERT OR REPLACE INTO taken (id, next_occurrence) VALUES (?, ?)", batch.items()
        )
        return assigned

    def _take_derived(
        self, base: str, batch: dict[str, int | None], known: dict[str, int | None]
    ) -> str:
        if base not in batch and base not in known:
            batch[base] = 1
            return base
        counter = batch[base] if base in batch else known[base]
        # A given id may hold the base (counter NULL): numbering then starts at -2.
        occurrence = counter or 1
        while True:
            candidate = numbered(base, occurrence)
            occurrence += 1
            if candidate not in batch and not self._lookup([candidate]):
                break
        batch[base] = occurrence
        batch[candidate] = None
        return candidate

    def _lookup(self, keys: Iterable[str]) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        pending = list(keys)
        # Chunks within SQLite's smallest bound-parameter limit (999 before 3.32).
        for start in range(0, len(pending), _LOOKUP_CHUNK):
            chunk = pending[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, next_occurrence FROM taken WHERE id IN ({marks})"
            found.update(self.execute(query, chunk).fetchall())
        return found


def _duplicate(row_id: str) -> str:
    return (
        f"id: duplicate of an earlier row's id {_shown.repr(row_id)} "
        "(given and derived ids must be unique)"
    )
