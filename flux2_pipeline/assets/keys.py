"""Every name the flux2 assets own: asset keys, the partitions, sensor, job and resource keys.

The factory is the only place that names things; everything else asks a `Flux2Keys`.
A key prefix moves every name, so two pipelines can live in one code location.

Example::

    >>> keys = Flux2Keys.from_prefix("team_a")
    >>> keys.edits.to_user_string(), keys.partitions_name, keys.resource("ledger")
    ('team_a/flux2_edits', 'team_a__flux2_prompt_tables', 'team_a__flux2_ledger')

The resource keys are namespaced (`flux2_runcomfy`, `flux2_ledger`, `flux2_storage`) so
they never meet a project's own `storage`. Code that binds the resources itself under the
keys of earlier versions (`runcomfy`, `ledger`, `storage`) passes
`resource_keys=LEGACY_RESOURCE_KEYS` to `build_flux2_definitions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from dagster import AssetKey

from flux2_pipeline.resources import SettingsError

_NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")

RESOURCE_ROLES = ("runcomfy", "ledger", "storage")
"""What the assets need: the API, the request ledger, the folders."""
DEFAULT_RESOURCE_KEYS: Mapping[str, str] = MappingProxyType(
    {role: f"flux2_{role}" for role in RESOURCE_ROLES}
)
"""The resource key of each role (under a key prefix: `<prefix>__flux2_<role>`)."""
ASSET_NAMES = ("flux2_prompt_tables", "flux2_edits", "flux2_images", "flux2_training_dataset")
"""The assets of one pipeline, by the names their keys end with unless renamed."""
LEGACY_RESOURCE_KEYS: Mapping[str, str] = MappingProxyType({role: role for role in RESOURCE_ROLES})
"""The resource keys of earlier versions, for code that supplies the resources itself."""


@dataclass(frozen=True)
class Flux2Keys:
    """The names of one flux2 pipeline (no prefix: the project's own names)."""

    prefix: tuple[str, ...] = ()
    resource_keys: tuple[tuple[str, str], ...] = tuple(DEFAULT_RESOURCE_KEYS.items())
    """Each role and its resource key before the prefix (see `DEFAULT_RESOURCE_KEYS`)."""
    renamed: tuple[tuple[str, AssetKey], ...] = ()
    """Assets given a key of their own (`with_asset_keys`), by name."""

    @classmethod
    def from_prefix(
        cls,
        key_prefix: str | Sequence[str] | None,
        resource_keys: Mapping[str, str] | None = None,
    ) -> Flux2Keys:
        """Keys under `key_prefix` (a string, a list of parts, or None).

        `resource_keys` overrides the resource key of some roles (`runcomfy`, `ledger`,
        `storage`), e.g. `LEGACY_RESOURCE_KEYS`; the prefix still applies.
        """
        parts: tuple[str, ...] = ()
        if key_prefix is not None:
            parts = (key_prefix,) if isinstance(key_prefix, str) else tuple(key_prefix)
        for part in parts:
            if not _NAME_PART.match(part):
                raise SettingsError(
                    f"key_prefix must be letters, digits and underscores, got {part!r}"
                )
        chosen = dict(DEFAULT_RESOURCE_KEYS)
        for role, key in (resource_keys or {}).items():
            if role not in RESOURCE_ROLES:
                choices = ", ".join(RESOURCE_ROLES)
                raise SettingsError(f"resource_keys: unknown role {role!r} (choose from {choices})")
            if not _NAME_PART.match(key):
                raise SettingsError(
                    f"resource_keys: {role} must be letters, digits and underscores, got {key!r}"
                )
            chosen[role] = key
        return cls(parts, tuple(chosen.items()))

    def asset(self, name: str) -> AssetKey:
        """The key of asset `name`: under the prefix, unless it was renamed.

        >>> Flux2Keys().with_asset_keys({"flux2_edits": AssetKey(["lake", "edits"])}).edits
        AssetKey(['lake', 'edits'])
        """
        return dict(self.renamed).get(name) or AssetKey([*self.prefix, name])

    def with_asset_keys(self, keys: Mapping[str, AssetKey]) -> Flux2Keys:
        """These names with some assets (`ASSET_NAMES`) under keys of their own.

        Partitions, sensors, jobs and resources keep their names.
        """
        unknown = sorted(set(keys) - set(ASSET_NAMES))
        if unknown:
            raise SettingsError(
                f"no asset named {unknown[0]!r} (choose from {', '.join(ASSET_NAMES)})"
            )
        chosen = {name: key for name, key in keys.items() if key != self.asset(name)}
        if len(set(chosen.values()) | {self.asset(n) for n in ASSET_NAMES if n not in chosen}) < 4:
            raise SettingsError(f"two flux2 assets cannot share a key: {dict(keys)}")
        return Flux2Keys(self.prefix, self.resource_keys, tuple(sorted(chosen.items())))

    def name(self, base: str) -> str:
        """A Dagster name (sensor, job, partitions, resource) under the prefix."""
        return "__".join((*self.prefix, base))

    def resource(self, role: str) -> str:
        """The resource key the assets ask for, by role: `runcomfy`, `ledger` or `storage`.

        >>> Flux2Keys().resource("storage")
        'flux2_storage'
        """
        return self.name(dict(self.resource_keys)[role])

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
    def observation_sensor_name(self) -> str:
        """The sensor that observes the input files' data versions (and registers them)."""
        return self.name("flux2_prompt_tables_observation_sensor")

    @property
    def automation_sensor_name(self) -> str:
        """The sensor that evaluates the downstream assets' automation conditions."""
        return self.name("flux2_automation_sensor")

    @property
    def job_name(self) -> str:
        """The job that materializes flux2_edits for one partition."""
        return self.name("flux2_edits_job")
