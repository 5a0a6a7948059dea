"""`LedgerResource`: the request ledger as a Dagster resource.

Example::

    resources = {"ledger": LedgerResource(url=EnvVar("FLUX2_LEDGER_URL"))}
    # or, by default, a SQLite file under the output directory:
    resources = {"ledger": LedgerResource(output_dir="data/output")}
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from flux2_pipeline.ledger import Ledger, redact_url
from flux2_pipeline.paths import is_remote_uri


class LedgerResource(ConfigurableResource):  # type: ignore[type-arg]
    """The durable record of paid submissions (SQLite by default, PostgreSQL for many hosts)."""

    url: str | None = Field(
        default=None,
        description="FLUX2_LEDGER_URL: sqlite:///path or postgresql://...; default is "
        "ledger.sqlite under output_dir.",
    )
    output_dir: str = Field(default="data/output", description="Where the default SQLite lives.")
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="FLUX2_CLAIM_LEASE_SECONDS: how long a run's claim on a row outlives its "
        "last heartbeat; then another run may take the row over (counted as unknown).",
    )
    account_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="FLUX2_ACCOUNT_CONCURRENCY: most jobs queued or running at once over every "
        "run, process and machine sharing the ledger.",
    )
    budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="FLUX2_BUDGET_USD: most money the ledger may spend, over every run.",
    )
    price_per_image_usd: float | None = Field(
        default=None,
        ge=0,
        description="FLUX2_PRICE_PER_IMAGE_USD: reserved per image until the API reports a cost.",
    )

    _ledger: Ledger | None = PrivateAttr(default=None)

    def __repr__(self) -> str:
        try:
            shown = redact_url(self.effective_url)
        except ValueError:
            shown = None
        return f"LedgerResource(url={shown!r})"

    __str__ = __repr__

    @property
    def effective_url(self) -> str:
        """The configured URL, or the default SQLite file (only for a local output_dir)."""
        if not self.url and is_remote_uri(self.output_dir):
            raise ValueError(
                "FLUX2_LEDGER_URL is required when FLUX2_OUTPUT_DIR is an object store: "
                "every machine writing there must share one ledger, e.g. postgresql://..."
            )
        return self.url or f"sqlite:///{(Path(self.output_dir) / 'ledger.sqlite').resolve()}"

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._ledger = Ledger.open(self.effective_url)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    @property
    def ledger(self) -> Ledger:
        """The open ledger; available inside a Dagster step."""
        if self._ledger is None:
            raise RuntimeError("LedgerResource is not set up (use it inside a Dagster step)")
        return self._ledger
