"""Settings from the environment, each checked with a one-line error naming the variable.

Example::

    >>> settings = Settings.from_env({"FLUX2_MAX_CONCURRENCY": "16"})
    >>> settings.max_concurrency, settings.input_dir.name
    (16, 'prompts')
    >>> Settings.from_env({"FLUX2_MAX_CONCURRENCY": "lots"})
    Traceback (most recent call last):
    SettingsError: FLUX2_MAX_CONCURRENCY must be a whole number from 1 to 4096, got 'lots'

`FLUX2_OUTPUT_DIR` may be an object-store URI such as `s3://bucket/prefix` (the `s3` extra,
credentials and endpoint from the usual AWS_* variables); then FLUX2_LEDGER_URL is required,
because every machine writing there must share one ledger.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from upath import UPath

from flux2_pipeline.paths import ensure_upath, is_local, is_remote_uri, local_path
from flux2_pipeline.runcomfy import DEFAULT_BASE_URL

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_CONCURRENCY_LIMIT = 4096
DEFAULT_OUTPUT_DIR = UPath("data/output")
REMOTE_LEDGER_REQUIRED = (
    "FLUX2_LEDGER_URL is required when FLUX2_OUTPUT_DIR is an object store: every machine "
    "writing there must share one ledger, e.g. postgresql://user@host:5432/flux2"
)
# fsspec implementation module and how to install it, per object-store scheme.
_FILESYSTEM_MODULES = {
    "s3": ("s3fs", "pip install 'flux2-pipeline[s3]'"),
    "s3a": ("s3fs", "pip install 'flux2-pipeline[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}


class SettingsError(ValueError):
    """A missing or malformed setting; the message is one line naming the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline reads from the environment (see CONTRACT.md).

    `output_dir` is a `UPath`: a local folder (a `pathlib.Path` subclass) or an object-store
    URI; a `str` or `Path` given to the constructor is converted with `paths.as_path`.
    """

    base_url: str = DEFAULT_BASE_URL
    input_dir: Path = Path("data/prompts")
    output_dir: UPath = DEFAULT_OUTPUT_DIR
    max_concurrency: int = 8
    ledger_url: str | None = None
    step_retries: int = 3
    step_retry_delay: float = 10.0
    api_token: str | None = field(default=None, repr=False)
    account_concurrency: int | None = None
    budget_usd: float | None = None
    price_per_image_usd: float | None = None
    claim_lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, UPath):
            object.__setattr__(self, "output_dir", ensure_upath(self.output_dir))

    @property
    def output_is_remote(self) -> bool:
        """True when FLUX2_OUTPUT_DIR is an object store rather than a local folder."""
        return not is_local(self.output_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the FLUX2_* and RUNCOMFY_* variables."""
        env = os.environ if env is None else env
        base_url = _url(env, "RUNCOMFY_BASE_URL", DEFAULT_BASE_URL)
        token = env.get("RUNCOMFY_API_TOKEN") or None
        if token is not None and (token != token.strip() or any(c.isspace() for c in token)):
            raise SettingsError("RUNCOMFY_API_TOKEN must not contain spaces or line breaks")
        output_dir = _output_dir(env, "FLUX2_OUTPUT_DIR", "data/output")
        ledger_url = _ledger_url(env)
        if ledger_url is None and not is_local(output_dir):
            raise SettingsError(REMOTE_LEDGER_REQUIRED)
        budget = _money(env, "FLUX2_BUDGET_USD")
        price = _money(env, "FLUX2_PRICE_PER_IMAGE_USD")
        if budget is not None and price is None:
            raise SettingsError(
                "FLUX2_BUDGET_USD needs FLUX2_PRICE_PER_IMAGE_USD (the price reserved for each "
                "image when its job is submitted), e.g. 0.025"
            )
        return cls(
            base_url=base_url,
            input_dir=_path(env, "FLUX2_INPUT_DIR", "data/prompts").absolute(),
            output_dir=output_dir,
            max_concurrency=_int(env, "FLUX2_MAX_CONCURRENCY", 8, 1, MAX_CONCURRENCY_LIMIT),
            ledger_url=ledger_url,
            step_retries=_int(env, "FLUX2_STEP_RETRIES", 3, 0, 20),
            step_retry_delay=_seconds(env, "FLUX2_STEP_RETRY_DELAY", 10.0),
            api_token=token,
            account_concurrency=_optional_int(
                env, "FLUX2_ACCOUNT_CONCURRENCY", 1, MAX_CONCURRENCY_LIMIT
            ),
            budget_usd=budget,
            price_per_image_usd=price,
            claim_lease_seconds=_seconds(env, "FLUX2_CLAIM_LEASE_SECONDS", 60.0) or 60.0,
        )

    @property
    def targets_local_emulator(self) -> bool:
        """True when the base URL is a loopback address (the emulator needs no token)."""
        return is_loopback(self.base_url)

    def require_token(self) -> None:
        """Refuse to talk to a remote API without a token (never fall back to the emulator)."""
        if self.api_token is None and not self.targets_local_emulator:
            raise SettingsError(
                f"RUNCOMFY_API_TOKEN is required for {self.base_url} "
                "(set it, or point RUNCOMFY_BASE_URL at a local emulator)"
            )

    @property
    def effective_ledger_url(self) -> str:
        """FLUX2_LEDGER_URL, or the SQLite file under a local output directory.

        Raises `SettingsError` when the output is an object store and no ledger is set.
        """
        if self.ledger_url:
            return self.ledger_url
        if not is_local(self.output_dir):
            raise SettingsError(REMOTE_LEDGER_REQUIRED)
        return f"sqlite:///{(local_path(self.output_dir) / 'ledger.sqlite').resolve()}"


def is_loopback(url: str) -> bool:
    """True for http(s) URLs on 127.0.0.1, localhost or ::1."""
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name} must be an http(s) URL such as {default}, got {value!r}")
    return value.rstrip("/")


def _path(env: Mapping[str, str], name: str, default: str) -> Path:
    value = env.get(name, "").strip() or default
    if "\x00" in value:
        raise SettingsError(f"{name} must be a directory path, got a value with a NUL byte")
    return Path(value).expanduser()


def _output_dir(env: Mapping[str, str], name: str, default: str) -> UPath:
    value = env.get(name, "").strip() or default
    if "\x00" in value:
        raise SettingsError(f"{name} must be a directory path, got a value with a NUL byte")
    if not is_remote_uri(value):
        return ensure_upath(Path(value).expanduser().absolute())
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if not parts.netloc:
        raise SettingsError(f"{name} must name a bucket, such as {scheme}://bucket/prefix")
    module, install = _FILESYSTEM_MODULES.get(scheme, ("", ""))
    if module:
        try:
            importlib.import_module(module)
        except ImportError:
            raise SettingsError(
                f"{name} points at an object store ({scheme}://), which needs {module} ({install})"
            ) from None
    return ensure_upath(value.rstrip("/"))


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise SettingsError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return value


def _optional_int(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    if not env.get(name, "").strip():
        return None
    return _int(env, name, low, low, high)


def _money(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1e9 or value != value:
        raise SettingsError(f"{name} must be an amount in USD of 0 or more, got {raw!r}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 86400.0:
        raise SettingsError(f"{name} must be a number of seconds from 0 to 86400, got {raw!r}")
    return value


def _ledger_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("FLUX2_LEDGER_URL", "").strip()
    if not raw:
        return None
    scheme = raw.split(":", 1)[0].lower()
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
        raise SettingsError(
            "FLUX2_LEDGER_URL must be sqlite:///path/to/ledger.db or "
            "postgresql://user@host:port/database"
        )
    return raw
