"""The settings catalogue: each setting declared once, and docs/settings.md made from it."""

from __future__ import annotations

from pathlib import Path

from flux2_pipeline.resources import SECRETS, SETTINGS
from flux2_pipeline.settings import CATALOGUE, Settings, settings_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_what_the_catalogue_renders() -> None:
    assert DOCS.read_text() == settings_markdown(), (
        "docs/settings.md is out of date: run "
        "`python -m flux2_pipeline.settings > docs/settings.md`"
    )


def test_every_setting_has_one_variable_a_meaning_and_a_rule() -> None:
    variables = [item.variable for item in CATALOGUE.values() if item.variable]
    assert len(variables) == len(set(variables))
    assert set(CATALOGUE) >= set(SETTINGS)
    for name, item in CATALOGUE.items():
        assert item.name == name and item.meaning and item.rule, name
    assert {name for name, item in CATALOGUE.items() if item.secret} == SECRETS
    assert {"api_token", "ledger_url"} == SECRETS


def test_every_variable_reaches_its_field() -> None:
    assert {item.variable for item in CATALOGUE.values()} >= {
        "RUNCOMFY_API_TOKEN",
        "FLUX2_STEP_RETRIES",
        "FLUX2_PARALLEL_PARTITIONS",
        "FLUX2_PARTITIONS_PER_RUN",
        "DAGSTER_HOME",
    }
    settings = Settings.from_env({"FLUX2_PARALLEL_PARTITIONS": "3", "FLUX2_STEP_RETRY_DELAY": "2"})
    assert (settings.parallel_partitions, settings.step_retries.delay) == (3, 2.0)


def test_the_components_attributes_are_the_catalogues() -> None:
    from flux2_pipeline import Flux2EditsComponent

    properties = Flux2EditsComponent.model().model_json_schema()["properties"]
    for name, item in CATALOGUE.items():
        assert (name in properties) == item.attribute, name
        if item.variable and item.attribute:
            assert properties[name]["description"].startswith(f"{item.variable}: "), name
