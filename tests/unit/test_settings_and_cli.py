"""Settings from the environment and CLI usage errors: one line, naming the variable."""

from __future__ import annotations

import pytest

from flux2_pipeline.cli import main
from flux2_pipeline.settings import Settings, SettingsError


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.base_url == "https://model-api.runcomfy.net"
    assert settings.input_dir.parts[-2:] == ("data", "prompts")
    assert settings.output_dir.parts[-2:] == ("data", "output")
    assert settings.max_concurrency == 8
    assert settings.effective_ledger_url.endswith("data/output/ledger.sqlite")
    assert (settings.step_retries, settings.step_retry_delay) == (3, 10.0)


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
        Settings.from_env({}).require_token()
    Settings.from_env({"RUNCOMFY_BASE_URL": "http://127.0.0.1:8188"}).require_token()
    Settings.from_env({"RUNCOMFY_API_TOKEN": "t"}).require_token()


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
