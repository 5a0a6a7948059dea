"""The command's first line: the price, the cost of the rows still to pay, the balance.

`flux2-pipeline materialize` says what it is about to spend before it starts any run, and
under `FLUX2_BALANCE_CHECK=stop` does not start one that the account's balance cannot
cover. Each run checks again for itself (runs started from the UI or a sensor too), with
the same figures in its metadata; see `flux2_pipeline.batch.estimate`.

Example::

    estimate = estimate_for_command(Settings.from_env(), partitions=["cats"])
    print(estimate.line())
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator, Sequence

from upath import UPath

from flux2_pipeline.batch import InputRow, InputTableError, read_input_rows
from flux2_pipeline.batch.estimate import RunEstimate, estimate_run, quote_price, unpaid_work
from flux2_pipeline.ledger import Ledger
from flux2_pipeline.paths import list_files, presign
from flux2_pipeline.settings import Settings


def estimate_for_command(settings: Settings, partitions: Sequence[str] = ()) -> RunEstimate:
    """The estimate over the named partitions' input files (default: every file)."""
    return asyncio.run(_estimate(settings, partitions))


async def _estimate(settings: Settings, partitions: Sequence[str]) -> RunEstimate:
    runcomfy = settings.runcomfy
    client = await runcomfy.create_client()
    try:
        price = await quote_price(client, runcomfy.price_per_image_usd)
        ledger = Ledger.open(settings.ledger.effective_url)
        try:
            work = await asyncio.to_thread(
                unpaid_work, _readable_inputs(settings, partitions), ledger
            )
        finally:
            ledger.close()
        return await estimate_run(client, work, price, runcomfy.balance_check)
    finally:
        await client.aclose()


def _readable_inputs(
    settings: Settings, partitions: Sequence[str]
) -> list[tuple[str, Iterator[list[InputRow]]]]:
    storage = settings.storage
    if partitions:
        paths = [storage.input_path(key) for key in partitions]
    else:
        paths = [found.path for found in list_files(storage.input_root(), ".parquet")]
    return [(path.stem, _rows_while_readable(settings, path)) for path in paths]


def _rows_while_readable(settings: Settings, path: UPath) -> Iterator[list[InputRow]]:
    # Streamed, so memory stays flat; an unreadable file is the run's to report.
    try:
        yield from read_input_rows(
            path,
            defaults=settings.runcomfy.parameter_defaults(),
            sign_url=functools.partial(presign, expires=settings.runcomfy.presign_expiry),
        )
    except (InputTableError, OSError):
        return
