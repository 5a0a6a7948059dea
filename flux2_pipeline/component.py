"""`Flux2EditsComponent`: the flux2 pipeline for YAML users (`dg`), on top of the factory.

Start with the scaffolder, which writes a commented `defs.yaml` (every attribute), a
sample prompt table, and lists the environment variables it reads::

    dg scaffold defs flux2_pipeline.Flux2EditsComponent image_edits

A `defs.yaml`::

    type: flux2_pipeline.Flux2EditsComponent
    attributes:
      input_dir: data/prompts
      output_dir: data/output
      api_token: "{{ env.RUNCOMFY_API_TOKEN }}"
      ledger_url: "{{ env.FLUX2_LEDGER_URL }}"
      defaults: {image_size: landscape_4_3, num_inference_steps: 20}
      translation:
        owners: ["team:ml"]
      assets:
        flux2_edits:
          automation_condition: "{{ automation_condition.eager() }}"

Every attribute is described, typed and bounded in the component's schema, so
`dg check yaml` (and an editor with the schema) points at a bad value's line before
anything loads. Every attribute means what the environment variable of the same setting
means; relative folders are relative to the project root. `api_token` and a `ledger_url`
with a password must be written as `{{ env.NAME }}`: the component keeps them as
`EnvVar("NAME")`, so Dagster's run storage never holds their values.
"""

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, get_args, get_origin

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Component,
    ComponentLoadContext,
    Definitions,
    Resolvable,
    Resolver,
)
from dagster.components import ResolutionContext, scaffold_with
from dagster.components.resolved.core_models import AssetAttributesModel
from dagster.components.utils.translation import (
    TranslationFn,
    TranslationFnResolver,
    TranslatorResolvingInfo,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from flux2_pipeline.assets import StepRetries, build_flux2_definitions
from flux2_pipeline.assets.keys import ASSET_NAMES, Flux2Keys
from flux2_pipeline.assets.observe import register_partitions_on_load
from flux2_pipeline.assets.ranges import DEFAULT_PARTITIONS_PER_RUN, MAX_PARTITIONS_PER_RUN
from flux2_pipeline.component_scaffold import Flux2EditsScaffolder
from flux2_pipeline.ledger import DEFAULT_LEASE_SECONDS
from flux2_pipeline.paths import is_fsspec_uri, is_remote_uri
from flux2_pipeline.resources import SettingsError, build_resources, settings_error
from flux2_pipeline.resources.errors import describe_rule
from flux2_pipeline.resources.runcomfy import MAX_CONCURRENCY_LIMIT
from flux2_pipeline.runcomfy.models import PARAMETER_DEFAULTS, PARAMETER_NAMES, EditRequest

_ENV_TEMPLATE = re.compile(
    r"^\s*\{\{\s*env(?:\.(?P<attr>\w+)|\(\s*['\"](?P<call>\w+)['\"]\s*\))\s*\}\}\s*$"
)
_TEMPLATE = r"\s*\{\{.*\}\}\s*"


def _strings(pattern: str) -> dict[str, Any]:
    """Dagster lets every attribute be a `{{ ... }}` template string, so a schema would
    take any string: this keeps strings to `pattern` or a template, for `dg check yaml`."""
    return {"pattern": f"^(?:{pattern}|{_TEMPLATE})$"}


AssetName: TypeAlias = Literal[
    "flux2_prompt_tables", "flux2_edits", "flux2_images", "flux2_training_dataset"
]
"""The assets of the component, by the names `translation` and `assets` use."""
BackfillPolicyName: TypeAlias = Literal["multi_run", "single_run"]
BACKFILL_POLICIES: tuple[str, ...] = get_args(BackfillPolicyName)


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


def _secret(description: str) -> Resolver:
    return Resolver(
        _resolve_secret,
        model_field_type=str | None,
        inject_before_resolve=False,  # see the template itself, to keep `env.NAME` a name
        description=description + ' Write "{{ env.NAME }}": only the name is stored.',
    )


def _edit_defaults_model() -> type[BaseModel]:
    """The `defaults` attribute's schema: every optional edit parameter of `EditRequest`,
    with its type and bounds, none required."""
    fields: dict[str, Any] = {}
    for name in PARAMETER_NAMES:
        info = EditRequest.model_fields[name]
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        rule = f"one of {', '.join(choices)}" if choices else describe_rule(info)
        described = f"{name}: {rule}; the API's default is {PARAMETER_DEFAULTS[name]!r}."
        fields[name] = (annotation | None, Field(default=None, description=described))
    return create_model(
        "EditDefaults",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Edit parameters for rows that leave them null; a row's own value wins.",
        **fields,
    )


EditDefaults = _edit_defaults_model()


def _resolve_defaults(context: ResolutionContext, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    value = raw.model_dump(exclude_none=True) if isinstance(raw, BaseModel) else raw
    resolved = context.resolve_value(value)
    if not isinstance(resolved, Mapping):
        raise SettingsError(
            f"defaults must be a mapping of edit parameters ({', '.join(PARAMETER_NAMES)})"
        )
    return {name: item for name, item in resolved.items() if item is not None}


def _resolve_assets(
    context: ResolutionContext, raw: Mapping[str, Any] | None
) -> dict[str, TranslationFn[str]]:
    """Each asset's own attributes, as a translation of that asset alone."""
    found: dict[str, TranslationFn[str]] = {}
    for name, attributes in (raw or {}).items():
        info = TranslatorResolvingInfo(
            asset_attributes=attributes,
            resolution_context=context.at_path("assets"),
            model_key=name,
        )
        found[name] = _bind(info)
    return found


def _bind(info: TranslatorResolvingInfo) -> TranslationFn[str]:
    def translate(spec: AssetSpec, name: str) -> AssetSpec:
        return info.get_asset_spec(spec, {"asset": name, "spec": spec})

    return translate


Translation: TypeAlias = Annotated[
    TranslationFn[str],
    TranslationFnResolver(template_vars_for_translation_fn=lambda name: {"asset": name}),
]


@scaffold_with(Flux2EditsScaffolder)
@dataclass
class Flux2EditsComponent(Component, Resolvable):
    """FLUX.2 \\[dev] image edits of a folder of prompt tables, with a paid-request ledger.

    Yields the observable `flux2_prompt_tables` (one partition per Parquet file, versioned
    by its sha256), `flux2_edits`, `flux2_images`, `flux2_training_dataset`, their checks,
    the input-folder and observation sensors, and the resources they use (under
    `flux2_runcomfy`, `flux2_ledger`, `flux2_storage`). Rows' own parameter values win over
    `defaults`. `translation` (every asset, with `{{ asset }}` its name) and `assets`
    (by name) set keys, groups, owners, tags, kinds, freshness policies and automation
    conditions, as dagster-sling's component does; subclasses may override
    `get_asset_spec` and `execute`. Start with
    `dg scaffold defs flux2_pipeline.Flux2EditsComponent image_edits`.
    """

    input_dir: Annotated[
        str,
        Resolver.default(
            description="FLUX2_INPUT_DIR: folder of input Parquet tables, one partition per "
            "file `<key>.parquet`; relative to the project root.",
            examples=["data/prompts"],
        ),
    ] = "data/prompts"
    output_dir: Annotated[
        str,
        Resolver.default(
            description="FLUX2_OUTPUT_DIR: root of every dataset written, a folder (relative to "
            "the project root) or an object-store URI such as s3://bucket/prefix.",
            examples=["data/output", "s3://my-bucket/flux2"],
        ),
    ] = "data/output"
    base_url: Annotated[
        str | None,
        Resolver.default(
            description="RUNCOMFY_BASE_URL: the API root (unset: https://model-api.runcomfy.net); "
            "a loopback URL for the flux2-pipeline emulator.",
            examples=["{{ env.RUNCOMFY_BASE_URL }}"],
        ),
    ] = None
    api_token: Annotated[
        SecretSetting | None,
        _secret("RUNCOMFY_API_TOKEN: the API's bearer token (optional only for the emulator)."),
    ] = None
    max_concurrency: Annotated[
        int,
        Field(ge=1, le=MAX_CONCURRENCY_LIMIT),
        Resolver.default(
            description="FLUX2_MAX_CONCURRENCY: most API jobs in flight at once from one step "
            f"(1 to {MAX_CONCURRENCY_LIMIT}).",
        ),
    ] = 8
    account_concurrency: Annotated[
        int | None,
        Field(ge=1),
        Resolver.default(
            description="FLUX2_ACCOUNT_CONCURRENCY: most jobs the account may have queued or "
            "running at once, over every run sharing the ledger (unset: no shared cap).",
        ),
    ] = None
    ledger_url: Annotated[
        SecretSetting | None,
        _secret(
            "FLUX2_LEDGER_URL: where the request ledger lives, sqlite:///path or "
            "postgresql://... (unset: ledger.sqlite under a local output_dir)."
        ),
    ] = None
    budget_usd: Annotated[
        float | None,
        Field(ge=0),
        Resolver.default(
            description="FLUX2_BUDGET_USD: most money the ledger may spend over every run "
            "that shares it (unset: no limit).",
        ),
    ] = None
    price_per_image_usd: Annotated[
        float | None,
        Field(ge=0),
        Resolver.default(
            description="FLUX2_PRICE_PER_IMAGE_USD: the price of one output image, reserved "
            "when a job is submitted (unset: the model's price from the API).",
        ),
    ] = None
    account_base_url: Annotated[
        str | None,
        Resolver.default(
            description="RUNCOMFY_ACCOUNT_BASE_URL: root of RunComfy's account API, where the "
            "balance is read (unset: https://api.runcomfy.net, or base_url on loopback).",
            examples=["{{ env.RUNCOMFY_ACCOUNT_BASE_URL }}"],
        ),
    ] = None
    balance_check: Annotated[
        Literal["stop", "warn", "off"],
        Resolver.default(
            json_schema_extra=_strings("stop|warn|off"),
            description="FLUX2_BALANCE_CHECK: before the first submit, the estimated cost of "
            "the rows still to pay against the account's balance: stop (do not start when it "
            "cannot be covered), warn, or off.",
        ),
    ] = "stop"
    max_decode_pixels: Annotated[
        int | None,
        Field(ge=1),
        Resolver.default(
            description="FLUX2_MAX_DECODE_PIXELS: images above this many pixels are stored "
            "and described from their header, never decoded (unset: 120 MP).",
        ),
    ] = None
    claim_lease_seconds: Annotated[
        float,
        Field(gt=0, le=86400),
        Resolver.default(
            description="FLUX2_CLAIM_LEASE_SECONDS: how long a run's claim on a row outlives "
            "its last heartbeat (more than 0, at most 86400).",
        ),
    ] = DEFAULT_LEASE_SECONDS
    step_retries: Annotated[
        int,
        Field(ge=0, le=20),
        Resolver.default(
            description="FLUX2_STEP_RETRIES: times a failed partition step is re-run (0 to 20); "
            "the ledger keeps completed rows from being paid again.",
        ),
    ] = 3
    step_retry_delay: Annotated[
        float,
        Field(ge=0, le=86400),
        Resolver.default(
            description="FLUX2_STEP_RETRY_DELAY: seconds before the first re-run (0 to 86400), "
            "growing exponentially, with jitter.",
        ),
    ] = 10.0
    defaults: Annotated[
        dict[str, Any],
        Resolver(
            _resolve_defaults,
            model_field_type=EditDefaults,
            description="Edit parameters for rows that leave them null, each typed and bounded "
            "as the API's schema; a row's own values win.",
            examples=[{"image_size": "landscape_4_3", "num_inference_steps": 20}],
        ),
    ] = field(default_factory=dict)
    key_prefix: Annotated[
        str | None,
        Resolver.default(
            json_schema_extra=_strings("[A-Za-z0-9_]+"),
            description="Puts every asset key under this prefix and every other name "
            "(partitions, sensors, job, resources) after `<prefix>__`, so two pipelines can "
            "share a code location. Letters, digits and underscores.",
            examples=["team_a"],
        ),
    ] = None
    group_name: Annotated[
        str,
        Resolver.default(
            json_schema_extra=_strings("[A-Za-z0-9_]+"),
            description="The asset group of every asset (letters, digits, _).",
        ),
    ] = "flux2"
    pool: Annotated[
        str | None,
        Resolver.default(
            description="The Dagster concurrency pool of flux2_edits steps; limit it with "
            "`dagster instance concurrency set <pool> N`.",
            examples=["runcomfy_account"],
        ),
    ] = None
    partitions_per_run: Annotated[
        int,
        Field(ge=1, le=MAX_PARTITIONS_PER_RUN),
        Resolver.default(
            description="FLUX2_PARTITIONS_PER_RUN: most partitions one run of a multi_run "
            f"backfill covers, and one run of the file sensor (1 to {MAX_PARTITIONS_PER_RUN}).",
        ),
    ] = DEFAULT_PARTITIONS_PER_RUN
    backfill_policy: Annotated[
        BackfillPolicyName,
        Resolver.default(
            json_schema_extra=_strings("|".join(BACKFILL_POLICIES)),
            description="multi_run: a backfill runs in runs of up to partitions_per_run "
            "partitions. single_run: one run covers the whole range, which "
            "`dg launch --partition-range A...B` requires.",
        ),
    ] = "multi_run"
    register_partitions_on_load: Annotated[
        bool,
        Resolver.default(
            description="When the code location loads with DAGSTER_HOME set, add the input "
            "folder's new files as partitions, so `dg launch --partition KEY` and the UI work "
            "before any sensor has run (a listing and one query per load).",
        ),
    ] = True
    translation: Annotated[
        Translation | None,
        Resolver.default(
            description="Attributes for every asset's spec (key, group_name, owners, tags, "
            "kinds, description, metadata, freshness_policy, automation_condition), with "
            "`{{ asset }}` the asset's name and `{{ spec }}` its spec.",
            examples=[{"owners": ["team:ml"], "tags": {"stage": "{{ asset }}"}}],
        ),
    ] = None
    assets: Annotated[
        dict[str, TranslationFn[str]],
        Resolver(
            _resolve_assets,
            model_field_type=dict[AssetName, AssetAttributesModel],
            inject_before_resolve=False,
            description="Attributes of one asset's spec, by its name (flux2_prompt_tables, "
            "flux2_edits, flux2_images, flux2_training_dataset); applied after translation.",
            examples=[{"flux2_edits": {"owners": ["team:ml"], "kinds": ["runcomfy"]}}],
        ),
    ] = field(default_factory=dict)

    def get_asset_spec(self, name: str, spec: AssetSpec) -> AssetSpec:
        """The spec of asset `name` (one of `ASSET_NAMES`), from the one the factory made.

        The default applies `translation`, then `assets[name]`. Override it to set
        attributes in code; a changed key moves the asset, and every dependency, check
        and lineage entry follows it.

        Example::

            class TeamEdits(Flux2EditsComponent):
                def get_asset_spec(self, name, spec):
                    spec = super().get_asset_spec(name, spec)
                    return spec.merge_attributes(owners=["team:ml"])
        """
        partitions_def = spec.partitions_def
        if self.translation is not None:
            spec = self.translation(spec, name)
        if name in self.assets:
            spec = self.assets[name](spec, name)
        if spec.partitions_def != partitions_def:
            raise SettingsError(
                f"{name}: partitions_def cannot be changed: the input files are the partitions"
            )
        return spec

    def execute(
        self, name: str, context: AssetExecutionContext, step: Callable[[], Iterator[Any]]
    ) -> Iterator[Any]:
        """Run the step of asset `name` (flux2_edits, flux2_images, flux2_training_dataset).

        `step()` runs it and yields its events; the default yields them unchanged.

        Example::

            class LoggedEdits(Flux2EditsComponent):
                def execute(self, name, context, step):
                    context.log.info(f"{name}: {context.partition_keys}")
                    yield from step()
        """
        yield from step()

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        """The factory's `Definitions`, with resources built from the attributes."""
        root = Path(context.project_root)
        values: dict[str, Any] = {
            "input_dir": _under(root, self.input_dir),
            "output_dir": _under(root, self.output_dir),
            "base_url": self.base_url or None,
            "account_base_url": self.account_base_url or None,
            "balance_check": self.balance_check,
            "max_concurrency": self.max_concurrency,
            "account_concurrency": self.account_concurrency,
            "budget_usd": self.budget_usd,
            "price_per_image_usd": self.price_per_image_usd,
            "claim_lease_seconds": self.claim_lease_seconds,
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
        if self.backfill_policy not in BACKFILL_POLICIES:
            raise SettingsError(
                f"backfill_policy must be one of {', '.join(BACKFILL_POLICIES)}, "
                f"got {self.backfill_policy!r}"
            )
        translated = self._translates()
        defs = build_flux2_definitions(
            runcomfy=resources.runcomfy,
            ledger=resources.ledger,
            storage=resources.storage,
            key_prefix=self.key_prefix,
            group_name=self.group_name,
            retry_policy=retries.policy(),
            pool=self.pool,
            partitions_per_run=self.partitions_per_run,
            single_run_backfills=self.backfill_policy == "single_run",
            asset_spec=self.get_asset_spec if translated else None,
            execute=self.execute if self._executes() else None,
        )
        if self.register_partitions_on_load:
            register_partitions_on_load(Flux2Keys.from_prefix(self.key_prefix), resources.storage)
        return defs

    def _translates(self) -> bool:
        overridden = type(self).get_asset_spec is not Flux2EditsComponent.get_asset_spec
        return overridden or self.translation is not None or bool(self.assets)

    def _executes(self) -> bool:
        return type(self).execute is not Flux2EditsComponent.execute


def _under(root: Path, folder: str) -> str:
    if is_remote_uri(folder) or is_fsspec_uri(folder) or Path(folder).expanduser().is_absolute():
        return folder
    return str(root / folder)


__all__ = ["ASSET_NAMES", "EditDefaults", "Flux2EditsComponent", "SecretSetting"]
