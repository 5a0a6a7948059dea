"""Flux2EditsComponent: a defs.yaml like docs/component.md's loads and materializes.

The YAML's `defaults` fill the parameters a row leaves null, and a row's own values win.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance, EnvVar

from flux2_pipeline import Flux2EditsComponent
from flux2_pipeline.assets import Flux2Keys, register_input_files
from flux2_pipeline.cli.runs import run_partitions
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.resources import Flux2Storage, LedgerResource, RunComfyResource, SettingsError
from tests.helpers.component import causes, load_project
from tests.helpers.emulator import TEST_TOKEN, prompt_rows
from tests.helpers.tables import write_table

DOCUMENTED_YAML = """\
type: flux2_pipeline.Flux2EditsComponent
attributes:
  input_dir: data/prompts
  output_dir: data/output
  base_url: "{{ env.RUNCOMFY_BASE_URL }}"
  api_token: "{{ env.RUNCOMFY_API_TOKEN }}"
  max_concurrency: 8
  ledger_url: "{{ env.FLUX2_LEDGER_URL }}"
  step_retries: 0
  defaults: {image_size: landscape_4_3, num_inference_steps: 20}
"""
# account_concurrency, budget_usd and price_per_image_usd are checked below by loading only:
# this branch's EditRunner does not take them yet.
LIMITS_YAML = """\
  account_concurrency: 32
  budget_usd: 100
  price_per_image_usd: 0.02
"""


@pytest.fixture
def project(tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RUNCOMFY_BASE_URL", emulator.base_url)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TEST_TOKEN)
    monkeypatch.delenv("FLUX2_LEDGER_URL", raising=False)
    return tmp_path


def test_a_contract_defs_yaml_materializes_with_its_defaults_and_rows_winning(
    project: Path, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    defs = load_project(project, DOCUMENTED_YAML)
    keys = Flux2Keys()
    assert {keys.edits, keys.images, keys.training_dataset} <= set(defs.resolve_all_asset_keys())
    rows = prompt_rows(emulator.base_url, "yaml", 3, image_size=None, num_inference_steps=None)
    rows[1].update(image_size="portrait_4_3", num_inference_steps=8)  # its own values win
    write_table(project / "data" / "prompts", "yaml", rows)

    storage = Flux2Storage(input_dir=str(project / "data" / "prompts"))
    assert list(register_input_files(instance, keys, storage).found) == ["yaml"]
    job = defs.resolve_implicit_global_asset_job_def()
    [summary] = run_partitions(job, instance, ["yaml"], [keys.edits, keys.images])
    assert summary.succeeded, summary.error
    assert (summary.completed, summary.images) == (3, 6)

    results = pq.read_table(project / "data" / "output" / "flux2_edits" / "yaml.parquet")
    got = [(r["image_size"], r["num_inference_steps"]) for r in results.to_pylist()]
    assert got == [("landscape_4_3", 20), ("portrait_4_3", 8), ("landscape_4_3", 20)]
    assert (project / "data" / "output" / "ledger.sqlite").is_file()
    assert emulator.state.counters.jobs_created == 3


def test_the_yaml_secrets_stay_environment_references(project: Path) -> None:
    defs = load_project(project, DOCUMENTED_YAML + LIMITS_YAML)
    resources = defs.resources or {}
    runcomfy = resources["flux2_runcomfy"]
    ledger = resources["flux2_ledger"]
    assert isinstance(runcomfy, RunComfyResource) and isinstance(ledger, LedgerResource)
    assert isinstance(runcomfy.api_token, EnvVar)
    assert runcomfy.api_token.env_var_name == "RUNCOMFY_API_TOKEN"
    assert ledger.url is None  # FLUX2_LEDGER_URL unset: the SQLite default
    assert (runcomfy.account_concurrency, runcomfy.price_per_image_usd) == (32, 0.02)
    assert ledger.budget_usd == 100.0
    assert runcomfy.defaults == {"image_size": "landscape_4_3", "num_inference_steps": 20}


def test_a_literal_token_in_yaml_is_refused(project: Path) -> None:
    yaml = DOCUMENTED_YAML.replace('"{{ env.RUNCOMFY_API_TOKEN }}"', "sk-literal-999")
    with pytest.raises(Exception) as caught:
        load_project(project, yaml)
    chain = [caught.value, *causes(caught.value)]
    problem = next(e for e in chain if isinstance(e, SettingsError))
    assert str(problem).startswith("api_token must come from an environment variable")
    assert "sk-literal-999" not in str(problem)


def test_a_bad_attribute_is_refused_by_the_schema_at_its_line(project: Path) -> None:
    yaml = DOCUMENTED_YAML.replace("max_concurrency: 8", "max_concurrency: 0").replace(
        "num_inference_steps: 20", "num_inference_steps: 200"
    )
    with pytest.raises(Exception) as caught:
        load_project(project, yaml)
    text = "\n".join(str(e) for e in [caught.value, *causes(caught.value)])
    assert re.search(r"attributes\.max_concurrency\S* at \S+defs\.yaml:7`", text), text
    assert "greater than or equal to 1" in text
    assert re.search(r"attributes\.defaults\.EditDefaults\.num_inference_steps at \S+:10`", text)
    assert "less than or equal to 50" in text


def test_a_bad_templated_attribute_is_one_line_naming_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A template passes the schema; its value is checked once resolved.
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "0")
    yaml = DOCUMENTED_YAML.replace(
        "max_concurrency: 8", 'max_concurrency: "{{ env.FLUX2_MAX_CONCURRENCY }}"'
    )
    with pytest.raises(Exception) as caught:
        load_project(project, yaml)
    problem = next(e for e in [caught.value, *causes(caught.value)] if isinstance(e, SettingsError))
    assert str(problem) == "max_concurrency must be a whole number from 1 to 4096, got '0'"


def test_partitions_per_run_sets_the_backfill_ranges(project: Path) -> None:
    defs = load_project(project, DOCUMENTED_YAML + "  partitions_per_run: 7\n")
    keys = Flux2Keys()
    for asset in (keys.edits, keys.images):
        policy = defs.resolve_assets_def(asset).backfill_policy
        assert policy is not None and policy.max_partitions_per_run == 7
    with pytest.raises(Exception) as caught:
        load_project(project, DOCUMENTED_YAML + "  partitions_per_run: 0\n")
    text = "\n".join(str(e) for e in [caught.value, *causes(caught.value)])
    assert re.search(r"attributes\.partitions_per_run\S* at \S+defs\.yaml:11`", text), text


def test_max_decode_pixels_sets_the_decode_ceiling(project: Path) -> None:
    default = load_project(project, DOCUMENTED_YAML).resources or {}
    assert default["flux2_storage"].max_decode_pixels == 120_000_000
    chosen = load_project(project, DOCUMENTED_YAML + "  max_decode_pixels: 50000000\n")
    assert (chosen.resources or {})["flux2_storage"].max_decode_pixels == 50_000_000


def test_a_key_prefix_moves_every_name(project: Path) -> None:
    defs = load_project(project, DOCUMENTED_YAML + "  key_prefix: team_a\n  pool: runcomfy\n")
    keys = Flux2Keys.from_prefix("team_a")
    assert keys.edits == AssetKey(["team_a", "flux2_edits"])
    assert keys.edits in set(defs.resolve_all_asset_keys())
    assert set(defs.resources or {}) == {
        "team_a__flux2_runcomfy",
        "team_a__flux2_ledger",
        "team_a__flux2_storage",
    }
    edits = defs.resolve_assets_def(keys.edits)
    assert edits.partitions_def is not None
    assert edits.partitions_def.name == "team_a__flux2_prompt_tables"  # type: ignore[attr-defined]
    assert edits.node_def.pool == "runcomfy"


def test_the_component_is_registered_for_dg() -> None:
    from dagster.components.core.package_entry import discover_entry_point_package_objects

    found = {
        f"{key.namespace}.{key.name}": obj
        for key, obj in discover_entry_point_package_objects().items()
    }
    assert found.get("flux2_pipeline.Flux2EditsComponent") is Flux2EditsComponent
