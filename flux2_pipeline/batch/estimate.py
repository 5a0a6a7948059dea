"""Before the first submit: the price, what the rows still to pay will cost, the balance.

The price of one output image is `FLUX2_PRICE_PER_IMAGE_USD` when set, else the model's
published `base_price_usd` (asked once per run). The rows still to pay are the valid rows
that the ledger holds neither a completed nor a live job for. The balance is the
account's, when its route answers. A missing, failing or refusing price or balance route
is a note, never a failure: a token the account API refuses may still be one the model
API takes, and a token both refuse is refused, free of charge, at the first submit.

Example::

    price = await quote_price(client, configured=None)
    todo = unpaid_work([("cats", read_input_rows(path))], ledger)
    estimate = await estimate_run(client, todo, price, balance_check="stop")
    print(estimate.line())   # price 0.025 USD/image (the model's published price); ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from flux2_pipeline.batch.tables import InputRow, InputTableError
from flux2_pipeline.ledger import Ledger, make_row_key
from flux2_pipeline.net import redact_text
from flux2_pipeline.runcomfy import AsyncRunComfyClient, RunComfyError

BalanceCheck = Literal["stop", "warn", "off"]

PRICE_FROM_SETTING = "FLUX2_PRICE_PER_IMAGE_USD"
PRICE_FROM_MODEL = "the model's published price"


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """The price of one output image and where it came from (None when unknown)."""

    price_usd: float | None
    source: str

    def describe(self) -> str:
        if self.price_usd is None:
            return f"price unknown ({self.source})"
        return f"price {self.price_usd:g} USD/image ({self.source})"


@dataclass(frozen=True, slots=True)
class UnpaidWork:
    """The valid rows the ledger holds no completed or live job for, and their images."""

    rows: int = 0
    images: int = 0

    def __add__(self, other: UnpaidWork) -> UnpaidWork:
        return UnpaidWork(self.rows + other.rows, self.images + other.images)


@dataclass(frozen=True, slots=True)
class RunEstimate:
    """What a run is about to spend, against what the account holds."""

    price: PriceQuote
    work: UnpaidWork
    balance_usd: float | None = None
    balance_note: str | None = None

    @property
    def cost_usd(self) -> float | None:
        if self.price.price_usd is None:
            return None
        return round(self.price.price_usd * self.work.images, 6)

    @property
    def balance_short(self) -> bool:
        """True when the balance is known and cannot cover the estimate."""
        cost = self.cost_usd
        return cost is not None and self.balance_usd is not None and cost > self.balance_usd

    def line(self) -> str:
        """One line for a person: the price and its source, the estimate, the balance."""
        cost = self.cost_usd
        estimate = f"{self.work.rows} rows still to pay ({self.work.images} images)" + (
            f", about {cost:.4f} USD" if cost is not None else ""
        )
        if self.balance_usd is not None:
            balance = f"balance {self.balance_usd:.4f} USD"
        else:
            balance = f"balance unknown ({self.balance_note or 'not asked'})"
        return f"{self.price.describe()}; {estimate}; {balance}"

    def shortfall_error(self) -> str:
        """The one line that stops a run whose estimate the balance cannot cover."""
        return (
            f"the account's balance ({self.balance_usd:.4f} USD) cannot cover the "
            f"{self.work.rows} rows still to pay (about {self.cost_usd:.4f} USD at "
            f"{self.price.price_usd:g} USD/image); top up the account, or set "
            "FLUX2_BALANCE_CHECK=warn to start anyway"
        )


async def quote_price(client: AsyncRunComfyClient, configured: float | None) -> PriceQuote:
    """The configured price, else the model's published one; None with a reason if neither."""
    if configured is not None:
        return PriceQuote(configured, PRICE_FROM_SETTING)
    try:
        published = await client.model_price()
    except RunComfyError as exc:
        return PriceQuote(None, f"the model route failed: {redact_text(str(exc))[:160]}")
    return PriceQuote(published.price_usd, PRICE_FROM_MODEL)


async def read_balance(client: AsyncRunComfyClient) -> tuple[float | None, str | None]:
    """The account's balance in USD, or None and why it is not known."""
    try:
        balance = await client.balance()
    except RunComfyError as exc:
        return None, f"the balance route failed: {redact_text(str(exc))[:160]}"
    return balance.usd, None


def rows_while_readable(read: Callable[[], Iterable[list[InputRow]]]) -> Iterator[list[InputRow]]:
    """The batches `read()` gives, ending quietly where the table cannot be read: an
    unreadable table fails its own partition, with its own words, not the estimate."""
    try:
        yield from read()
    except (InputTableError, OSError):
        return


def unpaid_work(
    partitions: Iterable[tuple[str, Iterable[list[InputRow]]]], ledger: Ledger
) -> UnpaidWork:
    """Count the valid rows (and their images) the ledger has no completed or live job for."""
    total = UnpaidWork()
    for partition, batches in partitions:
        for batch in batches:
            keyed = {
                make_row_key(partition, row.row_id, row.fingerprint or row.request.fingerprint()): (
                    row.request.num_images
                )
                for row in batch
                if row.request is not None
            }
            known = ledger.lookup(keyed) if keyed else {}
            for key, images in keyed.items():
                history = known.get(key)
                if history is not None and (history.completed or history.live):
                    continue
                total += UnpaidWork(1, images)
    return total


async def estimate_run(
    client: AsyncRunComfyClient,
    work: UnpaidWork,
    price: PriceQuote,
    balance_check: BalanceCheck,
) -> RunEstimate:
    """The run's estimate; the balance is asked unless `balance_check` is "off" or nothing
    is left to pay."""
    if balance_check == "off":
        return RunEstimate(price, work, balance_note="FLUX2_BALANCE_CHECK=off")
    if work.rows == 0:
        return RunEstimate(price, work, balance_note="nothing to pay")
    balance, note = await read_balance(client)
    return RunEstimate(price, work, balance, note)
