"""The command's first line: the price, the cost of the rows still to pay, the balance
(each run checks again for itself: `flux2_pipeline.batch.estimate`).

Example::

    if estimate_allows_start(Settings.from_env(), partitions=["cats"], select=[]):
        ...  # the runs
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator, Sequence

from flux2_pipeline.batch import InputRow, read_input_rows
from flux2_pipeline.batch.estimate import (
    RunEstimate,
    UnpaidWork,
    estimate_run,
    quote_price,
    rows_while_readable,
    unpaid_work,
)
from flux2_pipeline.ledger import Ledger, LedgerUnavailableError
from flux2_pipeline.net import redact_text
from flux2_pipeline.paths import list_files, presign
from flux2_pipeline.settings import Settings


def estimate_allows_start(
    settings: Settings, partitions: Sequence[str], select: Sequence[str]
) -> bool:
    """Print the price, the estimate and the balance; False when the balance cannot cover it
    under FLUX2_BALANCE_CHECK=stop (nothing is submitted then)."""
    if select and "flux2_edits" not in select:
        return True  # no edit job is paid for by this command
    storage = settings.storage
    if storage.input_dir_problem() is not None or not all(
        storage.input_path(key).exists() for key in partitions
    ):
        return True  # `run_backfill` says what is wrong with the folder or names, in one line
    settings.runcomfy.check_token()
    estimate = estimate_for_command(settings, partitions)
    print(estimate.line(), flush=True)
    if not estimate.balance_short:
        return True
    if settings.runcomfy.balance_check == "stop":
        print(f"flux2-pipeline: not started: {estimate.shortfall_error()}", flush=True)
        return False
    print(f"flux2-pipeline: warning: {estimate.shortfall_error()}", flush=True)
    return True


def estimate_for_command(settings: Settings, partitions: Sequence[str] = ()) -> RunEstimate:
    """The estimate over the named partitions' input files (default: every file)."""
    return asyncio.run(_estimate(settings, partitions))


async def _estimate(settings: Settings, partitions: Sequence[str]) -> RunEstimate:
    runcomfy = settings.runcomfy
    client = await runcomfy.create_client()
    try:
        price = await quote_price(client, runcomfy.price_per_image_usd)
        try:
            # On this thread: the command does nothing else meanwhile, and a worker thread's
            # malloc arena would keep what the read allocated, a peak the run then adds to.
            with Ledger.open(settings.ledger.effective_url) as ledger:
                work = unpaid_work(_readable_inputs(settings, partitions), ledger)
        except LedgerUnavailableError as exc:
            # The run says so in its own words; the estimate only notes it.
            note = f"the ledger could not be read: {redact_text(str(exc))[:160]}"
            return RunEstimate(price, UnpaidWork(), balance_note=note)
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
    read = functools.partial(
        read_input_rows,
        defaults=settings.runcomfy.parameter_defaults(),
        sign_url=functools.partial(presign, expires=settings.runcomfy.presign_expiry),
    )
    return [(path.stem, rows_while_readable(functools.partial(read, path))) for path in paths]
