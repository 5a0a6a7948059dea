"""`LedgerResource`: the request ledger as a Dagster resource.

Example::

    storage = Flux2Storage(output_dir="data/output")
    resources = {"flux2_ledger": LedgerResource(url=EnvVar("FLUX2_LEDGER_URL"), storage=storage)}
    # or, by default, a SQLite file under the storage's output directory:
    resources = {"flux2_ledger": LedgerResource(storage=storage)}
"""

from dagster import ConfigurableResource, EnvVar, InitResourceContext, ResourceDependency
from pydantic import Field, PrivateAttr, field_validator

from flux2_pipeline.ledger import (
    DEFAULT_LEASE_SECONDS,
    Ledger,
    LedgerConfigError,
    parse_ledger_url,
    redact_database_url,
)
from flux2_pipeline.paths import local_path
from flux2_pipeline.resources.catalogue import setting
from flux2_pipeline.resources.errors import SettingsError
from flux2_pipeline.resources.storage import Flux2Storage

REMOTE_LEDGER_REQUIRED = (
    "FLUX2_LEDGER_URL is required when FLUX2_OUTPUT_DIR is an object store: every machine "
    "writing there must share one ledger, e.g. postgresql://user@host:5432/flux2"
)


class LedgerResource(ConfigurableResource):  # type: ignore[type-arg]
    """The durable record of paid submissions (SQLite by default, PostgreSQL for many hosts).

    `url` may hold a password: set it with `EnvVar("FLUX2_LEDGER_URL")` so Dagster's run
    storage keeps the variable's name, never its value.
    """

    url: str | None = Field(
        default=None,
        description="Where the request ledger lives, sqlite:///path or postgresql://... "
        "(unset: ledger.sqlite under a local output_dir; required for an object-store one).",
        json_schema_extra=setting("FLUX2_LEDGER_URL", name="ledger_url", secret=True),
    )
    budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="Most money the ledger may spend, summed over every run that shares it "
        "(unset: no limit).",
        json_schema_extra=setting("FLUX2_BUDGET_USD"),
    )
    lease_seconds: float = Field(
        default=DEFAULT_LEASE_SECONDS,
        gt=0,
        le=86400,
        description="How long a run's claim on a row outlives its last heartbeat; then "
        "another run may take the row over (counted as unknown).",
        json_schema_extra=setting("FLUX2_CLAIM_LEASE_SECONDS", name="claim_lease_seconds"),
    )
    storage: ResourceDependency[Flux2Storage]

    _ledger: Ledger | None = PrivateAttr(default=None)

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            parse_ledger_url(value)
        except LedgerConfigError as exc:
            raise ValueError(f"is not a usable ledger URL: {exc}") from None
        return value.strip()

    def __repr__(self) -> str:
        if isinstance(self.url, EnvVar):
            return f"LedgerResource(url=EnvVar({self.url.env_var_name!r}))"
        try:
            shown = redact_database_url(self.effective_url)
        except SettingsError:
            shown = None
        return f"LedgerResource(url={shown!r})"

    __str__ = __repr__

    @property
    def effective_url(self) -> str:
        """The configured URL, or the default SQLite file (only for a local output_dir).

        Outside a step (the command line), a URL given as an `EnvVar` is read here.
        """
        url = self.url.get_value() if isinstance(self.url, EnvVar) else self.url
        if url:
            return url
        if self.storage.output_is_remote:
            raise SettingsError(REMOTE_LEDGER_REQUIRED)
        folder = local_path(self.storage.output_root())
        return f"sqlite:///{(folder / 'ledger.sqlite').resolve()}"

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
