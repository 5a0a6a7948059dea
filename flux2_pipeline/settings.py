"""Settings from the environment, each checked with a one-line error naming the variable.

Example::

    >>> settings = Settings.from_env({"FLUX2_MAX_CONCURRENCY": "16"})
    >>> settings.max_concurrency, settings.input_dir.name
    (16, 'prompts')
    >>> Settings.from_env({"FLUX2_MAX_CONCURRENCY": "lots"})
    Traceback (most recent call last):
    SettingsError: FLUX2_MAX_CONCURRENCY must be a whole number from 1 to 4096, got 'lots'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from flux2_pipeline.runcomfy import DEFAULT_BASE_URL

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_CONCURRENCY_LIMIT = 4096


class SettingsError(ValueError):
    """A missing or malformed setting; the message is one line naming the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline reads from the environment (see CONTRACT.md)."""

    base_url: str = DEFAULT_BASE_URL
    input_dir: Path = Path("data/prompts")
    output_dir: Path = Path("data/output")
    max_concurrency: int = 8
    ledger_url: str | None = None
    step_retries: int = 3
    step_retry_delay: float = 10.0
    api_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the FLUX2_* and RUNCOMFY_* variables."""
        env = os.environ if env is None else env
        base_url = _url(env, "RUNCOMFY_BASE_URL", DEFAULT_BASE_URL)
        token = env.get("RUNCOMFY_API_TOKEN") or None
        if token is not None and (token != token.strip() or any(c.isspace() for c in token)):
            raise SettingsError("RUNCOMFY_API_TOKEN must not contain spaces or line breaks")
        return cls(
            base_url=base_url,
            input_dir=_path(env, "FLUX2_INPUT_DIR", "data/prompts").absolute(),
            output_dir=_path(env, "FLUX2_OUTPUT_DIR", "data/output").absolute(),
            max_concurrency=_int(env, "FLUX2_MAX_CONCURRENCY", 8, 1, MAX_CONCURRENCY_LIMIT),
            ledger_url=_ledger_url(env),
            step_retries=_int(env, "FLUX2_STEP_RETRIES", 3, 0, 20),
            step_retry_delay=_seconds(env, "FLUX2_STEP_RETRY_DELAY", 10.0),
            api_token=token,
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
        """FLUX2_LEDGER_URL, or the SQLite file under the output directory."""
        return self.ledger_url or f"sqlite:///{(self.output_dir / 'ledger.sqlite').resolve()}"


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
