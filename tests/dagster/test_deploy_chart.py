"""The deployment files apply their limits.

`helm` cannot be installed here (Debian has no package of it, the package index no wheel)
and the chart itself is in no package registry, so the chart's templates cannot be
rendered. Instead: deploy/kubernetes/values.yaml is checked against the part of the chart's
values schema that carries the limits (dagster_chart_values_subset.schema.json beside this
file, its source named inside), and what the chart's templates write into the instance's
dagster.yaml from those values is derived by their own conditions (`chart_instance_config`)
and validated with the installed Dagster's instance schema, beside both dagster.yaml
profiles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, instance_for_test
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import (
    filter_runs_to_should_retry,
)

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.resources import Flux2Storage
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "kubernetes" / "values.yaml"
PROFILES = [REPO / "deploy" / "dagster.yaml", REPO / "deploy" / "celery" / "dagster.yaml"]
CHART_SCHEMA = Path(__file__).with_name("dagster_chart_values_subset.schema.json")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def validated_instance_config(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """`config` as the installed Dagster reads a dagster.yaml: validated, defaults filled."""
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://dagster@db:5432/dagster")
    home = tmp_path / f"home-{len(list(tmp_path.iterdir()))}"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    processed, _ = dagster_instance_config(str(home))
    return dict(processed)


def chart_instance_config(values: dict[str, Any]) -> dict[str, Any]:
    """The limit-carrying keys the chart writes into the instance's dagster.yaml.

    By the conditions of its templates (`templates/configmap-instance.yaml`,
    `templates/helpers/instance/_concurrency.tpl`): `concurrency` only when
    `concurrency.enabled` (default false); `run_monitoring` and `run_retries` only when the
    daemon and the block are enabled, `run_retries` with `enabled` and `max_retries` alone;
    then `additionalInstanceConfig` appended as written, so a key it repeats would be a
    duplicate key in the file.
    """
    config: dict[str, Any] = {}
    concurrency = values.get("concurrency", {})
    if concurrency.get("enabled", False):
        config["concurrency"] = _concurrency(concurrency)
    daemon = values.get("dagsterDaemon", {})
    monitoring, retries = daemon.get("runMonitoring", {}), daemon.get("runRetries", {})
    if daemon.get("enabled") and monitoring.get("enabled"):
        config["run_monitoring"] = {
            "enabled": True,
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        }
    if daemon.get("enabled") and retries.get("enabled"):
        config["run_retries"] = {"enabled": True}
        if retries.get("maxRetries"):
            config["run_retries"]["max_retries"] = retries["maxRetries"]
    for key, value in (values.get("additionalInstanceConfig") or {}).items():
        assert key not in config, f"the rendered dagster.yaml would hold {key!r} twice"
        config[key] = value
    return config


def _concurrency(concurrency: dict[str, Any]) -> dict[str, Any]:
    pools, runs = concurrency.get("pools", {}), concurrency.get("runs", {})
    rendered: dict[str, Any] = {}
    pool_keys = {
        "defaultLimit": "default_limit",
        "granularity": "granularity",
        "opGranularityRunBuffer": "op_granularity_run_buffer",
    }
    if rendered_pools := {
        snake: pools[camel] for camel, snake in pool_keys.items() if camel in pools
    }:
        rendered["pools"] = rendered_pools
    rendered_runs: dict[str, Any] = {}
    if runs.get("maxConcurrentRuns") is not None:
        rendered_runs["max_concurrent_runs"] = runs["maxConcurrentRuns"]
    if runs.get("tagConcurrencyLimits"):
        rendered_runs["tag_concurrency_limits"] = [
            {
                "key": limit["key"],
                **({"value": limit["value"]} if limit.get("value") else {}),
                "limit": limit["limit"],
            }
            for limit in runs["tagConcurrencyLimits"]
        ]
    if rendered_runs:
        rendered["runs"] = rendered_runs
    return rendered


def test_the_helm_values_pass_the_charts_schema_for_the_limits() -> None:
    schema = json.loads(CHART_SCHEMA.read_text())
    values = load(VALUES)
    jsonschema.validate(values, schema)
    assert values["concurrency"]["enabled"] is True
    # The schema is no formality: the mistakes it exists for are refused.
    for broken in (
        {**values, "concurrency": {**values["concurrency"], "maxConcurrentRuns": 4}},
        {**values, "concurrency": {**values["concurrency"], "enabled": "yes"}},
        {**values, "concurrency": {"runs": {"tagConcurrencyLimits": [{"key": "k"}]}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_the_chart_writes_the_deploy_profiles_limits_into_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart renders from values.yaml holds the same limits as deploy/dagster.yaml,
    both as Dagster reads them (its own instance schema, defaults filled in)."""
    rendered = validated_instance_config(chart_instance_config(load(VALUES)), tmp_path, monkeypatch)
    profile = validated_instance_config(load(PROFILES[0]), tmp_path, monkeypatch)
    assert rendered["concurrency"] == profile["concurrency"]
    assert rendered["concurrency"]["runs"]["max_concurrent_runs"] == 4
    assert rendered["run_retries"] == profile["run_retries"]
    assert rendered["run_retries"]["retry_on_asset_or_op_failure"] is False
    monitoring = "free_slots_after_run_end_seconds"
    assert rendered["run_monitoring"][monitoring] == profile["run_monitoring"][monitoring] == 300


def test_without_enabled_the_chart_would_drop_every_concurrency_limit() -> None:
    values = load(VALUES)
    values["concurrency"].pop("enabled")
    assert "concurrency" not in chart_instance_config(values)


def test_the_helm_values_read_prompt_tables_from_the_object_store() -> None:
    """The code server (where the sensor lists the tables) and every run pod get the
    settings and secrets; the input is an object-store URL they can all reach, not a
    folder that no pod mounts."""
    text = VALUES.read_text()
    values = load(VALUES)
    [input_dir] = re.findall(r"--from-literal=FLUX2_INPUT_DIR=(\S+)", text)
    assert Flux2Storage(input_dir=input_dir).input_is_remote
    assert "/data/prompts" not in text
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RUNCOMFY_API_TOKEN"):
        assert f"--from-literal={variable}=" in text
    [deployment] = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for holder in (deployment, launcher):
        assert holder["envConfigMaps"] == [{"name": "flux2-settings"}]
        assert holder["envSecrets"] == [{"name": "flux2-secrets"}]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda path: str(path.relative_to(REPO)))
def test_the_dagster_yaml_profiles_pass_dagsters_schema(
    profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = validated_instance_config(load(profile), tmp_path, monkeypatch)
    assert config["run_retries"] == {
        "enabled": True,
        "max_retries": 1,
        "retry_on_asset_or_op_failure": False,
    }
    assert config["concurrency"]["pools"]["granularity"] == "run"
    misspelled = {**load(profile), "run_retries": {"enabled": True, "max_retry": 1}}
    with pytest.raises(DagsterInvalidConfigError):
        validated_instance_config(misspelled, tmp_path, monkeypatch)


def test_a_run_failed_by_its_step_is_not_run_again_under_the_profiles_run_retries(
    settings: Settings, emulator: EmulatorServer, tmp_path: Path
) -> None:
    """The profile's `run_retries`, on a real instance: a partition whose step failed (the
    API refuses the token, after the assets' own retries) is marked not to be re-run, and
    Dagster says why; a run that failed for another reason still is."""
    write_table(
        Path(settings.storage.input_dir), "refused", prompt_rows(emulator.base_url, "refused", 2)
    )
    emulator.state.config.token = "a-revoked-token"
    run_retries = load(PROFILES[0])["run_retries"]
    with instance_for_test(overrides={"run_retries": run_retries}) as instance:
        (summary,) = run_backfill(
            settings, instance=instance, parallel=1, select=["flux2_edits"]
        ).partitions
        assert not summary.succeeded
        [record] = instance.get_run_records()
        run = record.dagster_run
        assert run.status is DagsterRunStatus.FAILURE
        assert run.tags["dagster/failure_reason"] == "STEP_FAILURE"
        assert run.tags["dagster/will_retry"] == "false"
        # The run-retry daemon's own choice of the failed runs to re-run leaves it out.
        assert list(filter_runs_to_should_retry([run], instance)) == []
        assert _engine_messages(instance, run.run_id, "Not retrying run")

        # A run that failed outside its steps, reported failed as run monitoring reports
        # a run whose pod died, is re-run.
        job = settings.definitions().resolve_implicit_global_asset_job_def()
        lost = instance.create_run_for_job(job, tags={"dagster/partition": "refused"})
        instance.report_run_failed(lost, "the run worker's pod was lost")
        lost_run = instance.get_run_by_id(lost.run_id)
        assert lost_run is not None and lost_run.tags["dagster/will_retry"] == "true"
        assert [r.run_id for r in filter_runs_to_should_retry([lost_run], instance)] == [
            lost.run_id
        ]


def _engine_messages(instance: DagsterInstance, run_id: str, start: str) -> list[str]:
    return [
        event.message
        for event in instance.all_logs(run_id)
        if event.message and event.message.startswith(start)
    ]
