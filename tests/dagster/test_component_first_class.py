"""Flux2EditsComponent as a Dagster engineer expects it: a described, bounded schema;
`translation`, `assets` and the `get_asset_spec` / `execute` hooks; namespaced resource
keys (the old ones still usable); blocking checks; `dagster/uri`; no private Dagster
modules in the package.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    DagsterInstance,
    Definitions,
    build_defs_for_component,
)
from pydantic import ValidationError
from rich.text import Text

from flux2_pipeline import Flux2EditsComponent
from flux2_pipeline.assets import LEGACY_RESOURCE_KEYS, Flux2Keys, build_flux2_definitions
from flux2_pipeline.assets.uri import storage_uri
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.component import EditDefaults, SecretSetting
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.resources import (
    Flux2Storage,
    LedgerResource,
    RunComfyResource,
    SettingsError,
)
from flux2_pipeline.runcomfy.models import PARAMETER_NAMES
from tests.helpers.component import causes, load_project
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

REPO = Path(__file__).resolve().parents[2]
BOUNDED = {
    # attribute: (resource, its field)
    "max_concurrency": (RunComfyResource, "max_concurrency"),
    "account_concurrency": (RunComfyResource, "account_concurrency"),
    "price_per_image_usd": (RunComfyResource, "price_per_image_usd"),
    "budget_usd": (LedgerResource, "budget_usd"),
    "claim_lease_seconds": (LedgerResource, "lease_seconds"),
}


def _schema() -> dict[str, Any]:
    return Flux2EditsComponent.model().model_json_schema()


def _bounds(prop: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for option in prop.get("anyOf", [prop]):
        for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if name in option:
                found[name] = option[name]
    return found


def _resource_bounds(model: Any, name: str) -> dict[str, Any]:
    schema = model.model_json_schema()["properties"][name]
    return _bounds(schema)


def test_every_attribute_is_described_and_bounded_like_its_resource_field() -> None:
    properties = _schema()["properties"]
    undescribed = [name for name, prop in properties.items() if not prop.get("description")]
    assert not undescribed
    for attribute, (model, field) in BOUNDED.items():
        assert _bounds(properties[attribute]) == _resource_bounds(model, field), attribute
        assert _bounds(properties[attribute]), attribute
    assert _bounds(properties["step_retries"]) == {"minimum": 0, "maximum": 20}
    assert _bounds(properties["partitions_per_run"]) == {"minimum": 1, "maximum": 1000}


def test_defaults_are_typed_and_bounded_from_edit_request() -> None:
    assert tuple(EditDefaults.model_fields) == PARAMETER_NAMES
    EditDefaults.model_validate({"image_size": "landscape_4_3", "num_inference_steps": 20})
    for bad in (
        {"image_size": "huge"},
        {"num_inference_steps": 200},
        {"guidance_scale": -1},
        {"output_format": "gif"},
        {"temperature": 1},
    ):
        with pytest.raises(ValidationError):
            EditDefaults.model_validate(bad)
    model = Flux2EditsComponent.model()
    with pytest.raises(ValidationError, match="image_size"):
        model.model_validate({"defaults": {"image_size": "huge"}})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        model.model_validate({"max_concurrency": 0})


def test_the_summary_keeps_dev_through_rich_markup_and_cites_no_missing_file() -> None:
    doc = inspect.getdoc(Flux2EditsComponent) or ""
    summary = doc.split("\n\n")[0]
    # `dg list components` renders summaries as rich markup.
    assert Text.from_markup(summary).plain.startswith("FLUX.2 [dev] image edits")
    import flux2_pipeline.component as module

    for text in (doc, module.__doc__ or ""):
        for cited in re.findall(r"[\w./-]+\.(?:md|yaml|toml|py)\b", text):
            if cited in ("defs.yaml",) or cited.startswith(("dagster", "flux2_pipeline.")):
                continue
            assert (REPO / cited).exists(), f"the docstring cites {cited}, not in the repo"


def test_a_bad_backfill_policy_is_one_line(project: Path) -> None:
    with pytest.raises(Exception) as caught:
        load_project(project, YAML + "  backfill_policy: singel_run\n")
    problem = next(e for e in [caught.value, *causes(caught.value)] if isinstance(e, SettingsError))
    assert str(problem) == "backfill_policy must be one of multi_run, single_run, got 'singel_run'"
    defs = load_project(project, YAML + "  backfill_policy: single_run\n")
    for key in (Flux2Keys().edits, Flux2Keys().images):
        policy = defs.resolve_assets_def(key).backfill_policy
        assert policy is not None and policy.policy_type.value == "SINGLE_RUN"


YAML = """\
type: flux2_pipeline.Flux2EditsComponent
attributes:
  input_dir: data/prompts
  output_dir: data/output
  base_url: "{{ env.RUNCOMFY_BASE_URL }}"
  api_token: "{{ env.RUNCOMFY_API_TOKEN }}"
  step_retries: 0
  register_partitions_on_load: false
"""

TRANSLATED = """\
  translation:
    owners: ["team:ml"]
    tags: {stage: "{{ asset }}"}
  assets:
    flux2_edits:
      key: lake/edits
      kinds: [runcomfy]
      automation_condition: "{{ automation_condition.eager() }}"
    flux2_images:
      group_name: media
"""


@pytest.fixture
def project(tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RUNCOMFY_BASE_URL", emulator.base_url)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TEST_TOKEN)
    monkeypatch.delenv("FLUX2_LEDGER_URL", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return tmp_path


def test_translation_and_assets_set_keys_owners_tags_kinds_and_automation(
    project: Path, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    defs = load_project(project, YAML + TRANSLATED)
    edits_key = AssetKey(["lake", "edits"])
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == {
        AssetKey("flux2_prompt_tables"),
        edits_key,
        AssetKey("flux2_images"),
        AssetKey("flux2_training_dataset"),
    }
    for key, spec in specs.items():
        assert spec.owners == ["team:ml"], key
    assert specs[edits_key].tags["stage"] == "flux2_edits"
    assert specs[AssetKey("flux2_images")].tags["stage"] == "flux2_images"
    assert specs[edits_key].kinds == {"runcomfy"}  # replaced, as in every Dagster translation
    assert specs[edits_key].automation_condition is not None
    assert specs[AssetKey("flux2_images")].group_name == "media"
    assert specs[edits_key].group_name == "flux2"
    # Every dependency, check and lineage entry follows the renamed asset.
    assert {dep.asset_key for dep in specs[AssetKey("flux2_images")].deps} == {edits_key}
    checks = {key.asset_key for key in defs.resolve_asset_graph().asset_check_keys}
    assert edits_key in checks and AssetKey("flux2_edits") not in checks

    write_table(project / "data" / "prompts", "cats", prompt_rows(emulator.base_url, "t", 2))
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["cats"])
    job = defs.resolve_implicit_global_asset_job_def()
    [summary] = run_partitions(job, instance, ["cats"], [edits_key, AssetKey("flux2_images")])
    assert summary.succeeded, summary.error
    assert summary.completed == 2
    event = instance.get_latest_materialization_event(edits_key)
    assert event is not None and event.asset_materialization is not None
    results = project / "data" / "output" / "flux2_edits" / "cats.parquet"
    assert event.asset_materialization.metadata["dagster/uri"].value == results.as_uri()
    images = instance.get_latest_materialization_event(AssetKey("flux2_images"))
    assert images is not None and images.asset_materialization is not None
    assert images.asset_materialization.metadata["dagster/uri"].value.startswith("file:///")


class TeamEdits(Flux2EditsComponent):
    """A subclass that sets owners in code and logs around each step."""

    calls: list[str] = []

    def get_asset_spec(self, name: str, spec: AssetSpec) -> AssetSpec:
        spec = super().get_asset_spec(name, spec)
        return spec.merge_attributes(owners=["team:subclass"], tags={"hooked": name})

    def execute(
        self, name: str, context: AssetExecutionContext, step: Callable[[], Iterator[Any]]
    ) -> Iterator[Any]:
        self.calls.append(f"{name}:start")
        yield from step()
        self.calls.append(f"{name}:end")


def test_get_asset_spec_and_execute_can_be_overridden(
    tmp_path: Path,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TEST_TOKEN)
    component = TeamEdits(
        input_dir=str(tmp_path / "prompts"),
        output_dir=str(tmp_path / "out"),
        base_url=emulator.base_url,
        api_token=SecretSetting(TEST_TOKEN, "RUNCOMFY_API_TOKEN"),
        step_retries=0,
        register_partitions_on_load=False,
    )
    defs = build_defs_for_component(component)
    for spec in defs.resolve_all_asset_specs():
        assert "team:subclass" in spec.owners
        assert spec.tags["hooked"] == spec.key.path[-1]
    write_table(tmp_path / "prompts", "dogs", prompt_rows(emulator.base_url, "h", 2))
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["dogs"])
    keys = Flux2Keys()
    [summary] = run_partitions(
        defs.resolve_implicit_global_asset_job_def(), instance, ["dogs"], [keys.edits, keys.images]
    )
    assert summary.succeeded, summary.error
    assert TeamEdits.calls == [
        "flux2_edits:start",
        "flux2_edits:end",
        "flux2_images:start",
        "flux2_images:end",
    ]


def test_resource_keys_are_namespaced_and_the_old_keys_still_work(tmp_path: Path) -> None:
    storage = Flux2Storage(input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"))
    runcomfy = RunComfyResource(base_url="http://127.0.0.1:9")
    ledger = LedgerResource(storage=storage)
    flux2 = build_flux2_definitions(runcomfy=runcomfy, ledger=ledger, storage=storage)
    assert set(flux2.resources or {}) == {"flux2_runcomfy", "flux2_ledger", "flux2_storage"}
    # A project's own `storage` no longer collides with the pipeline's.
    merged = Definitions.merge(flux2, Definitions(resources={"storage": "the project's own"}))
    merged.resolve_implicit_global_asset_job_def()

    # Code of earlier versions that binds the resources itself under the plain keys.
    legacy = Definitions.merge(
        build_flux2_definitions(resource_keys=LEGACY_RESOURCE_KEYS),
        Definitions(resources={"runcomfy": runcomfy, "ledger": ledger, "storage": storage}),
    )
    legacy.resolve_implicit_global_asset_job_def()
    edits = legacy.resolve_assets_def(Flux2Keys().edits)
    assert edits.required_resource_keys >= {"runcomfy", "ledger", "storage"}
    with pytest.raises(Exception, match="flux2_storage"):
        Definitions.merge(
            build_flux2_definitions(),
            Definitions(resources={"runcomfy": runcomfy, "ledger": ledger, "storage": storage}),
        ).resolve_implicit_global_asset_job_def()


def test_the_checks_that_must_stop_downstream_work_are_blocking() -> None:
    [edits] = [
        asset
        for asset in build_flux2_definitions().assets or []
        if isinstance(asset, AssetsDefinition) and Flux2Keys().edits in asset.keys
    ]
    blocking = {spec.name for spec in edits.check_specs if spec.blocking}
    assert blocking == {
        "all_valid_rows_completed",
        "request_ids_unique",
        "completed_rows_have_all_images",
    }


def test_storage_uris() -> None:
    assert storage_uri("/data/out/x.parquet") == "file:///data/out/x.parquet"
    assert storage_uri("s3://bucket/out/x.parquet") == "s3://bucket/out/x.parquet"


def test_the_package_imports_no_private_dagster_module() -> None:
    found = []
    for path in (REPO / "flux2_pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            found += [f"{path.name}: {name}" for name in names if name.startswith("dagster._")]
    assert found == []


def test_post_processing_reaches_the_prompt_tables(project: Path) -> None:
    post = """\
post_processing:
  assets:
    - target: "key:flux2_prompt_tables"
      attributes:
        owners: ["team:data"]
"""
    defs = load_project(project, YAML + post)
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert specs[AssetKey("flux2_prompt_tables")].owners == ["team:data"]
    assert specs[AssetKey("flux2_edits")].owners == []
