"""Property tests carry no per-example deadline, so a loaded machine cannot fail them."""

from hypothesis import settings


def test_the_loaded_profile_has_no_deadline() -> None:
    assert settings().deadline is None
