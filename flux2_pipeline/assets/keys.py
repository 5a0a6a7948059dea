"""Every name the flux2 assets own: asset keys, the partitions, sensor, job and resource keys.

The factory is the only place that names things; everything else asks a `Flux2Keys`.
A key prefix moves every name, so two pipelines can live in one code location.

Example::

    >>> keys = Flux2Keys.from_prefix("team_a")
    >>> keys.edits.to_user_string(), keys.partitions_name, keys.resource("ledger")
    ('team_a/flux2_edits', 'team_a__flux2_prompt_tables', 'team_a__ledger')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dagster import AssetKey

from flux2_pipeline.resources import SettingsError

_NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Flux2Keys:
    """The names of one flux2 pipeline (no prefix: the project's own names)."""

    prefix: tuple[str, ...] = ()

    @classmethod
    def from_prefix(cls, key_prefix: str | Sequence[str] | None) -> Flux2Keys:
        """Keys under `key_prefix` (a string, a list of parts, or None)."""
        if key_prefix is None:
            return cls()
        parts = (key_prefix,) if isinstance(key_prefix, str) else tuple(key_prefix)
        for part in parts:
            if not _NAME_PART.match(part):
                raise SettingsError(
                    f"key_prefix must be letters, digits and underscores, got {part!r}"
                )
        return cls(parts)

    def asset(self, name: str) -> AssetKey:
        """The key of asset `name` under the prefix."""
        return AssetKey([*self.prefix, name])

    def name(self, base: str) -> str:
        """A Dagster name (sensor, job, partitions, resource) under the prefix."""
        return "__".join((*self.prefix, base))

    def resource(self, base: str) -> str:
        """The resource key the assets ask for: `runcomfy`, `ledger` or `storage`."""
        return self.name(base)

    @property
    def prompt_tables(self) -> AssetKey:
        """The observable input tables (one partition per file)."""
        return self.asset("flux2_prompt_tables")

    @property
    def edits(self) -> AssetKey:
        """One partition's results dataset."""
        return self.asset("flux2_edits")

    @property
    def images(self) -> AssetKey:
        """One partition's images, stored by content hash."""
        return self.asset("flux2_images")

    @property
    def training_dataset(self) -> AssetKey:
        """The Hugging Face-loadable dataset across partitions."""
        return self.asset("flux2_training_dataset")

    @property
    def partitions_name(self) -> str:
        """The dynamic partitions' name (one per input file)."""
        return self.name("flux2_prompt_tables")

    @property
    def sensor_name(self) -> str:
        """The input-folder sensor."""
        return self.name("flux2_prompt_files_sensor")

    @property
    def automation_sensor_name(self) -> str:
        """The sensor that evaluates the downstream assets' automation conditions."""
        return self.name("flux2_automation_sensor")

    @property
    def job_name(self) -> str:
        """The job that materializes flux2_edits for one partition."""
        return self.name("flux2_edits_job")
