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
means (docs/settings.md); relative folders are relative to the project root. `api_token`
and a `ledger_url` with a password must be written as `{{ env.NAME }}`: the component
keeps them as `EnvVar("NAME")`, so Dagster's run storage never holds their values.
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
from pydantic import BaseModel, ConfigDict, Field, create_model

from flux2_pipeline.assets import build_flux2_definitions
from flux2_pipeline.assets.keys import ASSET_NAMES, Flux2Keys
from flux2_pipeline.assets.observe import register_partitions_on_load
from flux2_pipeline.component_scaffold import Flux2EditsScaffolder
from flux2_pipeline.paths import is_fsspec_uri, is_remote_uri
from flux2_pipeline.resources import SECRETS, SettingsError
from flux2_pipeline.resources.errors import describe_rule
from flux2_pipeline.resources.runcomfy import BalanceCheck
from flux2_pipeline.runcomfy.models import PARAMETER_DEFAULTS, PARAMETER_NAMES, EditRequest
from flux2_pipeline.settings import CATALOGUE, Settings

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


def _described(name: str) -> str:
    item = CATALOGUE[name]
    return f"{item.variable}: {item.meaning}"


def _setting(name: str, **extra: Any) -> Resolver:
    """The attribute of setting `name`: its field's type and bounds, its variable and meaning."""
    annotation = CATALOGUE[name].info.rebuild_annotation()
    if get_origin(annotation) is Literal:
        extra["json_schema_extra"] = _strings("|".join(get_args(annotation)))
    return Resolver(
        lambda context, raw: context.resolve_value(raw),
        model_field_type=annotation,  # a default resolver would drop it, and with it the bounds
        inject_before_resolve=False,
        description=_described(name),
        **extra,
    )


_DEFAULT = {name: item.default for name, item in CATALOGUE.items()}


def _secret(name: str) -> Resolver:
    return Resolver(
        _resolve_secret,
        model_field_type=str | None,
        inject_before_resolve=False,  # see the template itself, to keep `env.NAME` a name
        description=_described(name) + ' Write "{{ env.NAME }}": only the name is stored.',
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
        described = (
            f"{name}: {describe_rule(info)}; the API's default is {PARAMETER_DEFAULTS[name]!r}."
        )
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

    input_dir: Annotated[str, _setting("input_dir", examples=["data/prompts"])] = _DEFAULT[
        "input_dir"
    ]
    output_dir: Annotated[
        str, _setting("output_dir", examples=["data/output", "s3://my-bucket/flux2"])
    ] = _DEFAULT["output_dir"]
    base_url: Annotated[str, _setting("base_url", examples=["{{ env.RUNCOMFY_BASE_URL }}"])] = (
        _DEFAULT["base_url"]
    )
    api_token: Annotated[SecretSetting | None, _secret("api_token")] = None
    max_concurrency: Annotated[int, _setting("max_concurrency")] = _DEFAULT["max_concurrency"]
    account_concurrency: Annotated[int | None, _setting("account_concurrency")] = None
    ledger_url: Annotated[SecretSetting | None, _secret("ledger_url")] = None
    budget_usd: Annotated[float | None, _setting("budget_usd")] = None
    price_per_image_usd: Annotated[float | None, _setting("price_per_image_usd")] = None
    account_base_url: Annotated[
        str | None, _setting("account_base_url", examples=["{{ env.RUNCOMFY_ACCOUNT_BASE_URL }}"])
    ] = None
    balance_check: Annotated[BalanceCheck, _setting("balance_check")] = _DEFAULT["balance_check"]
    max_decode_pixels: Annotated[int, _setting("max_decode_pixels")] = _DEFAULT["max_decode_pixels"]
    claim_lease_seconds: Annotated[float, _setting("claim_lease_seconds")] = _DEFAULT[
        "claim_lease_seconds"
    ]
    step_retries: Annotated[int, _setting("step_retries")] = _DEFAULT["step_retries"]
    step_retry_delay: Annotated[float, _setting("step_retry_delay")] = _DEFAULT["step_retry_delay"]
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
    partitions_per_run: Annotated[int, _setting("partitions_per_run")] = _DEFAULT[
        "partitions_per_run"
    ]
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
        values = {name: getattr(self, name) for name, item in CATALOGUE.items() if item.attribute}
        values["input_dir"] = _under(root, self.input_dir)
        values["output_dir"] = _under(root, self.output_dir)
        env_names: dict[str, str] = {}
        for name in SECRETS:
            secret: SecretSetting | None = values.pop(name)
            if secret is not None and secret.value is not None:
                values[name] = secret.value
                if secret.variable:
                    env_names[name] = secret.variable
        settings = Settings.from_values(values, env_names=env_names)
        if self.backfill_policy not in BACKFILL_POLICIES:
            raise SettingsError(
                f"backfill_policy must be one of {', '.join(BACKFILL_POLICIES)}, "
                f"got {self.backfill_policy!r}"
            )
        translated = self._translates()
        defs = build_flux2_definitions(
            runcomfy=settings.runcomfy,
            ledger=settings.ledger,
            storage=settings.storage,
            key_prefix=self.key_prefix,
            group_name=self.group_name,
            retry_policy=settings.step_retries.policy(),
            pool=self.pool,
            partitions_per_run=settings.partitions_per_run,
            single_run_backfills=self.backfill_policy == "single_run",
            asset_spec=self.get_asset_spec if translated else None,
            execute=self.execute if self._executes() else None,
        )
        if self.register_partitions_on_load:
            register_partitions_on_load(Flux2Keys.from_prefix(self.key_prefix), settings.storage)
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
