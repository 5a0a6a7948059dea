"""Settings from the environment and CLI usage errors: one line, naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dagster import EnvVar

from flux2_pipeline.cli import main
from flux2_pipeline.resources import Flux2Storage, build_resources
from flux2_pipeline.settings import Settings, SettingsError


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.runcomfy.base_url == "https://model-api.runcomfy.net"
    assert Path(settings.storage.input_dir).parts[-2:] == ("data", "prompts")
    assert Path(settings.storage.output_dir).parts[-2:] == ("data", "output")
    assert settings.runcomfy.max_concurrency == 8
    assert settings.ledger.effective_url.endswith("data/output/ledger.sqlite")
    assert (settings.step_retries.retries, settings.step_retries.delay) == (3, 10.0)
    assert settings.runcomfy.account_concurrency is None
    assert settings.ledger.budget_usd is None
    assert settings.runcomfy.price_per_image_usd is None


def test_every_contract_variable_reaches_its_resource_field() -> None:
    settings = Settings.from_env(
        {
            "FLUX2_ACCOUNT_CONCURRENCY": "32",
            "FLUX2_BUDGET_USD": "100",
            "FLUX2_PRICE_PER_IMAGE_USD": "0.02",
            "FLUX2_MAX_CONCURRENCY": "16",
            "FLUX2_STEP_RETRIES": "1",
            "FLUX2_STEP_RETRY_DELAY": "2.5",
        }
    )
    assert settings.runcomfy.account_concurrency == 32
    assert settings.ledger.budget_usd == 100.0
    assert settings.runcomfy.price_per_image_usd == 0.02
    assert settings.runcomfy.max_concurrency == 16
    policy = settings.step_retries.policy()
    assert policy is not None and (policy.max_retries, policy.delay) == (1, 2.5)


def test_secrets_are_kept_as_environment_references() -> None:
    settings = Settings.from_env(
        {"RUNCOMFY_API_TOKEN": "sk-abc", "FLUX2_LEDGER_URL": "postgresql://u:pw@127.0.0.1/db"}
    )
    assert isinstance(settings.runcomfy.api_token, EnvVar)
    assert settings.runcomfy.api_token.env_var_name == "RUNCOMFY_API_TOKEN"
    assert isinstance(settings.ledger.url, EnvVar)
    assert "pw" not in repr(settings.ledger)


def test_a_secret_without_a_variable_is_refused_and_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        build_resources({"api_token": "sk-literal-123"})
    assert "sk-literal-123" not in str(caught.value)
    assert str(caught.value).startswith("api_token must come from an environment variable")
    with pytest.raises(SettingsError, match="ledger_url holds a password"):
        build_resources({"ledger_url": "postgresql://u:hunter2@127.0.0.1/db"})
    # A ledger URL without a password holds no secret.
    plain = build_resources({"ledger_url": "postgresql://u@127.0.0.1/db"})
    assert plain.ledger.url == "postgresql://u@127.0.0.1/db"


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ({"image_sise": "square"}, "defaults has no edit parameter 'image_sise'"),
        ({"num_inference_steps": 99}, "defaults breaks the edit schema: num_inference_steps"),
        ({"image_size": "huge"}, "defaults breaks the edit schema: image_size"),
    ],
)
def test_parameter_defaults_are_checked_against_the_edit_schema(
    defaults: dict[str, object], expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        build_resources({"defaults": defaults})
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_parameter_defaults_fill_only_what_they_name() -> None:
    resources = build_resources({"defaults": {"image_size": "landscape_4_3", "seed": 5}})
    assert resources.runcomfy.parameter_defaults() == {"image_size": "landscape_4_3", "seed": 5}


def test_importing_the_package_reads_no_environment() -> None:
    probe = (
        "import flux2_pipeline, flux2_pipeline.definitions, flux2_pipeline.component; "
        "print(sorted(flux2_pipeline.__all__)[:2])"
    )
    env = {"FLUX2_MAX_CONCURRENCY": "lots", "FLUX2_OUTPUT_DIR": "s3:///nobucket", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FLUX2_MAX_CONCURRENCY": "0"}, "FLUX2_MAX_CONCURRENCY"),
        ({"FLUX2_MAX_CONCURRENCY": "eight"}, "FLUX2_MAX_CONCURRENCY"),
        ({"FLUX2_MAX_CONCURRENCY": "100000"}, "FLUX2_MAX_CONCURRENCY"),
        ({"RUNCOMFY_BASE_URL": "ftp://api.test"}, "RUNCOMFY_BASE_URL"),
        ({"RUNCOMFY_BASE_URL": "not a url"}, "RUNCOMFY_BASE_URL"),
        ({"FLUX2_LEDGER_URL": "mysql://x/y"}, "FLUX2_LEDGER_URL"),
        ({"FLUX2_STEP_RETRIES": "-1"}, "FLUX2_STEP_RETRIES"),
        ({"FLUX2_STEP_RETRY_DELAY": "soon"}, "FLUX2_STEP_RETRY_DELAY"),
        ({"RUNCOMFY_API_TOKEN": "two words"}, "RUNCOMFY_API_TOKEN"),
        ({"FLUX2_ACCOUNT_CONCURRENCY": "0"}, "FLUX2_ACCOUNT_CONCURRENCY"),
        ({"FLUX2_ACCOUNT_CONCURRENCY": "many"}, "FLUX2_ACCOUNT_CONCURRENCY"),
        ({"FLUX2_BUDGET_USD": "-5"}, "FLUX2_BUDGET_USD"),
        ({"FLUX2_BUDGET_USD": "lots"}, "FLUX2_BUDGET_USD"),
        ({"FLUX2_PRICE_PER_IMAGE_USD": "-0.01"}, "FLUX2_PRICE_PER_IMAGE_USD"),
        ({"FLUX2_INPUT_DIR": "a\x00b"}, "FLUX2_INPUT_DIR"),
        ({"DAGSTER_HOME": "relative/home"}, "DAGSTER_HOME"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message.startswith(variable)
    assert "\n" not in message
    if "RUNCOMFY_API_TOKEN" in env:
        assert env["RUNCOMFY_API_TOKEN"] not in message


def test_a_remote_api_needs_a_token_and_a_loopback_emulator_does_not() -> None:
    with pytest.raises(SettingsError, match="RUNCOMFY_API_TOKEN is required"):
        Settings.from_env({}).runcomfy.check_token()
    Settings.from_env({"RUNCOMFY_BASE_URL": "http://127.0.0.1:8188"}).runcomfy.check_token()
    Settings.from_env({"RUNCOMFY_API_TOKEN": "t"}).runcomfy.check_token()


def test_the_token_is_not_in_the_settings_repr() -> None:
    settings = Settings.from_env({"RUNCOMFY_API_TOKEN": "sk-very-secret-123"})
    assert "sk-very-secret-123" not in repr(settings)
    assert "sk-very-secret-123" not in str(settings)


@pytest.mark.parametrize(
    "argv",
    [
        ["emulator", "--fault-429", "1.5"],
        ["emulator", "--port", "http"],
        ["emulator", "--latency", "-2"],
        ["emulator", "--max-concurrent", "0"],
        ["emulator", "--dialect", "klingon"],
        ["emulator", "--fault-200-error", "2"],
        ["emulator", "--result-lag", "-1"],
        ["emulator", "--price-usd", "-0.1"],
        ["emulator", "--balance-usd", "lots"],
        ["emulator", "--balance-route", "maybe"],
        ["emulator", "--keep-alive", "-5"],
        ["materialize", "--bogus"],
        ["nonsense"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_configuration_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLUX2_MAX_CONCURRENCY", "many")
    with pytest.raises(SystemExit) as caught:
        main(["materialize"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FLUX2_MAX_CONCURRENCY" in err


# FLUX2_OUTPUT_DIR as an object store (s3://bucket/prefix).

REMOTE = {"FLUX2_OUTPUT_DIR": "s3://flux2-bucket/out", "FLUX2_LEDGER_URL": "sqlite:////tmp/l.db"}


def test_an_s3_output_dir_is_a_upath_whose_str_is_the_uri() -> None:
    settings = Settings.from_env(REMOTE)
    assert settings.storage.output_is_remote
    assert str(settings.storage.output_root()) == "s3://flux2-bucket/out"
    storage = Flux2Storage(input_dir="in", output_dir=settings.storage.output_dir)
    assert str(storage.results_path("cats")) == "s3://flux2-bucket/out/flux2_edits/cats.parquet"
    assert str(storage.images_dir()) == "s3://flux2-bucket/out/images"
    assert str(storage.training_dataset_dir()).startswith("s3://flux2-bucket/out/")


def test_a_local_output_dir_prints_as_before(tmp_path: Path) -> None:
    settings = Settings.from_env({"FLUX2_OUTPUT_DIR": str(tmp_path / "out")})
    assert not settings.storage.output_is_remote
    assert str(settings.storage.output_root()) == str(tmp_path / "out")
    assert settings.storage.output_root() / "flux2_edits" == tmp_path / "out" / "flux2_edits"


def test_an_s3_output_dir_requires_a_shared_ledger() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FLUX2_OUTPUT_DIR": "s3://flux2-bucket/out"})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("FLUX2_LEDGER_URL is required when FLUX2_OUTPUT_DIR")
    assert "postgresql://" in message


def test_the_default_ledger_is_refused_for_an_s3_output_built_directly() -> None:
    from flux2_pipeline.resources import LedgerResource

    ledger = LedgerResource(storage=Flux2Storage(output_dir="s3://flux2-bucket/out"))
    with pytest.raises(SettingsError, match="FLUX2_LEDGER_URL"):
        _ = ledger.effective_url


def test_an_s3_output_dir_without_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # importing s3fs now fails
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(REMOTE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("FLUX2_OUTPUT_DIR") and "flux2-pipeline[s3]" in message


def test_an_s3_output_dir_must_name_a_bucket() -> None:
    with pytest.raises(SettingsError, match="FLUX2_OUTPUT_DIR must name a bucket"):
        Settings.from_env({**REMOTE, "FLUX2_OUTPUT_DIR": "s3:///prefix"})


def test_cli_s3_output_without_ledger_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLUX2_OUTPUT_DIR", "s3://flux2-bucket/out")
    monkeypatch.delenv("FLUX2_LEDGER_URL", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(["materialize"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FLUX2_LEDGER_URL" in err


def test_dagster_home_defaults_to_a_local_folder_per_remote_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux2_pipeline.cli.instance import default_dagster_home, open_instance

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    remote = Settings.from_env(REMOTE)
    other = Settings.from_env({**REMOTE, "FLUX2_OUTPUT_DIR": "s3://flux2-bucket/other"})
    home = default_dagster_home(remote)
    assert home.parent == tmp_path / "home" / ".flux2-pipeline" / "dagster"
    assert home != default_dagster_home(other)
    local = Settings.from_env({"FLUX2_OUTPUT_DIR": str(tmp_path / "out")})
    assert default_dagster_home(local) == tmp_path / "out" / ".dagster"

    instance = open_instance(remote)
    try:
        assert (home / "dagster.yaml").is_file()
    finally:
        instance.dispose()


# The progress display of `flux2-pipeline materialize`.

FIGURES = {
    "flux2/rows_total": 100,
    "flux2/rows_done": 40,
    "flux2/rows_failed": 2,
    "flux2/cost_usd": 1.25,
    "flux2/seconds": 10.0,
}


def test_progress_is_plain_lines_when_not_a_terminal() -> None:
    import io

    from flux2_pipeline.cli.progress import progress_view

    out = io.StringIO()
    with progress_view(out) as show:
        show("cats", FIGURES)
        show("cats", FIGURES)  # within 10 s of the last line: not repeated
    assert out.getvalue() == "cats: 40/100 rows, 4.0 rows/s, 2 failed, $1.25\n"


def test_progress_is_a_bar_on_a_terminal() -> None:
    import io

    from flux2_pipeline.cli.progress import progress_view

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with progress_view(out) as show:
        show("cats", FIGURES)
        show("cats", {**FIGURES, "flux2/rows_done": 100, "flux2/seconds": 20.0})
    screen = out.getvalue()
    assert "cats" in screen and "100/100" in screen and "$1.25" in screen


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"FLUX2_BALANCE_CHECK": "maybe"},
            "FLUX2_BALANCE_CHECK must be one of stop, warn, off, got 'maybe'",
        ),
        (
            {"RUNCOMFY_ACCOUNT_BASE_URL": "ftp://x"},
            "RUNCOMFY_ACCOUNT_BASE_URL must be an http(s) URL such as https://api.runcomfy.net, "
            "got 'ftp://x'",
        ),
    ],
)
def test_the_real_apis_settings_are_one_line_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert str(caught.value) == expected


def test_the_balance_check_and_the_account_api_reach_the_resource() -> None:
    settings = Settings.from_env(
        {"FLUX2_BALANCE_CHECK": "warn", "RUNCOMFY_ACCOUNT_BASE_URL": "http://127.0.0.1:9/"}
    )
    assert settings.runcomfy.balance_check == "warn"
    assert settings.runcomfy.account_base_url == "http://127.0.0.1:9"
