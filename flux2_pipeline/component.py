"""`Flux2EditsComponent`: the flux2 pipeline for YAML users (`dg`), on top of the factory.

A `defs.yaml`::

    type: flux2_pipeline.Flux2EditsComponent
    attributes:
      input_dir: data/prompts
      output_dir: data/output
      api_token: "{{ env.RUNCOMFY_API_TOKEN }}"
      ledger_url: "{{ env.FLUX2_LEDGER_URL }}"
      defaults: {image_size: landscape_4_3, num_inference_steps: 20}

Every attribute means what the environment variable of the same setting means (see
CONTRACT.md); relative folders are relative to the project root. `api_token` and a
`ledger_url` with a password must be written as `{{ env.NAME }}`: the component keeps
them as `EnvVar("NAME")`, so Dagster's run storage never holds their values.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from dagster import Component, ComponentLoadContext, Definitions, Resolvable, Resolver
from dagster.components.resolved.context import ResolutionContext
from pydantic import ValidationError

from flux2_pipeline.assets import StepRetries, build_flux2_definitions
from flux2_pipeline.assets.ranges import DEFAULT_PARTITIONS_PER_RUN, MAX_PARTITIONS_PER_RUN
from flux2_pipeline.paths import is_fsspec_uri, is_remote_uri
from flux2_pipeline.resources import SettingsError, build_resources, settings_error

_ENV_TEMPLATE = re.compile(
    r"^\s*\{\{\s*env(?:\.(?P<attr>\w+)|\(\s*['\"](?P<call>\w+)['\"]\s*\))\s*\}\}\s*$"
)


@dataclass(frozen=True)
class SecretSetting:
    """A secret attribute's value, and the environment variable it was read from, if any."""

    value: str | None
    variable: str | None = None

    def __repr__(self) -> str:
        return f"SecretSetting(variable={self.variable!r})"


def _resolve_secret(context: ResolutionContext, raw: Any) -> SecretSetting | None:
    """`{{ env.NAME }}` stays a reference to NAME; anything else is resolved as usual."""
    if raw is None:
        return None
    match = _ENV_TEMPLATE.match(str(raw))
    if match:
        variable = match.group("attr") or match.group("call")
        return SecretSetting(os.environ.get(variable) or None, variable)
    resolved = context.resolve_value(raw)
    return SecretSetting(str(resolved) if resolved not in (None, "") else None)


ResolvedSecret = Annotated[
    SecretSetting | None,
    Resolver(
        _resolve_secret,
        model_field_type=str | None,
        inject_before_resolve=False,  # see the template itself, to keep `env.NAME` a name
        description='A secret: write "{{ env.NAME }}" so only the name is stored.',
    ),
]


@dataclass
class Flux2EditsComponent(Component, Resolvable):
    """FLUX.2 [dev] image edits of a folder of prompt tables: flux2_edits, flux2_images,
    flux2_training_dataset, their checks and sensors.

    Rows' own parameter values win over `defaults`. See the module docstring for a
    `defs.yaml`; `dg check defs` validates one.
    """

    input_dir: str = "data/prompts"
    output_dir: str = "data/output"
    base_url: str | None = None
    api_token: ResolvedSecret = None
    max_concurrency: int = 8
    account_concurrency: int | None = None
    ledger_url: ResolvedSecret = None
    budget_usd: float | None = None
    price_per_image_usd: float | None = None
    step_retries: int = 3
    step_retry_delay: float = 10.0
    defaults: dict[str, Any] = field(default_factory=dict)
    key_prefix: str | None = None
    group_name: str = "flux2"
    pool: str | None = None
    partitions_per_run: int = DEFAULT_PARTITIONS_PER_RUN
    max_decode_pixels: int | None = None

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The factory's `Definitions`, with resources built from the attributes."""
        root = Path(context.project_root)
        values: dict[str, Any] = {
            "input_dir": _under(root, self.input_dir),
            "output_dir": _under(root, self.output_dir),
            "base_url": self.base_url or None,
            "max_concurrency": self.max_concurrency,
            "account_concurrency": self.account_concurrency,
            "budget_usd": self.budget_usd,
            "price_per_image_usd": self.price_per_image_usd,
            "defaults": self.defaults,
            "max_decode_pixels": self.max_decode_pixels,
        }
        env_names: dict[str, str] = {}
        for name, secret in (("api_token", self.api_token), ("ledger_url", self.ledger_url)):
            if secret is not None and secret.value is not None:
                values[name] = secret.value
                if secret.variable:
                    env_names[name] = secret.variable
        resources = build_resources(
            {name: value for name, value in values.items() if value is not None},
            env_names=env_names,
        )
        try:
            retries = StepRetries(retries=self.step_retries, delay=self.step_retry_delay)
        except ValidationError as exc:
            names = {"retries": "step_retries", "delay": "step_retry_delay"}
            raise settings_error(exc, StepRetries, names) from None
        if not 1 <= self.partitions_per_run <= MAX_PARTITIONS_PER_RUN:
            raise SettingsError(
                f"partitions_per_run must be a whole number from 1 to {MAX_PARTITIONS_PER_RUN}, "
                f"got {self.partitions_per_run!r}"
            )
        return build_flux2_definitions(
            runcomfy=resources.runcomfy,
            ledger=resources.ledger,
            storage=resources.storage,
            key_prefix=self.key_prefix,
            group_name=self.group_name,
            retry_policy=retries.policy(),
            pool=self.pool,
            partitions_per_run=self.partitions_per_run,
        )


def _under(root: Path, folder: str) -> str:
    if is_remote_uri(folder) or is_fsspec_uri(folder) or Path(folder).expanduser().is_absolute():
        return folder
    return str(root / folder)
