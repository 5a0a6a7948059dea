"""EditRequest validation, the state parser and the response parsers."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux2_pipeline.runcomfy import (
    IMAGE_SIZE_PIXELS,
    EditRequest,
    InvalidEditRequest,
    JobState,
    MalformedResponseError,
    UnknownJobStateError,
)
from flux2_pipeline.runcomfy.models import (
    parse_cancel,
    parse_result,
    parse_state,
    parse_status,
    parse_submit,
)

URL = "https://images.test/cat.png"


def issues_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidEditRequest) as caught:
        EditRequest.parse(data)
    return {issue.field: issue.rule for issue in caught.value.issues}


def test_defaults_follow_the_api_schema() -> None:
    req = EditRequest.parse({"prompt": "add a hat", "image_urls": URL})
    assert req.payload() == {
        "prompt": "add a hat",
        "image_urls": [URL],
        "guidance_scale": 2.5,
        "seed": 0,
        "num_inference_steps": 28,
        "image_size": "square_hd",
        "num_images": 1,
        "enable_prompt_expansion": False,
        "output_format": "png",
    }


def test_null_parameters_take_the_default() -> None:
    req = EditRequest.parse({"prompt": "p", "image_urls": [URL], "seed": None, "num_images": None})
    assert (req.seed, req.num_images) == (0, 1)


def test_more_than_three_urls_are_cut_with_a_warning() -> None:
    req = EditRequest.parse({"prompt": "p", "image_urls": [f"{URL}?{i}" for i in range(5)]})
    assert req.image_urls == (f"{URL}?0", f"{URL}?1", f"{URL}?2")
    assert req.warnings == ("image_urls: 5 URLs given, kept the first 3",)
    assert "warnings" not in req.payload()


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"image_urls": [URL]}, "prompt", "required"),
        ({"prompt": "", "image_urls": [URL]}, "prompt", "must not be empty"),
        ({"prompt": "   ", "image_urls": [URL]}, "prompt", "blank"),
        ({"prompt": "p", "image_urls": []}, "image_urls", "1 to 3 URLs"),
        ({"prompt": "p", "image_urls": ["ftp://x/y.png"]}, "image_urls", "http(s)"),
        ({"prompt": "p", "image_urls": ["not a url"]}, "image_urls", "http(s)"),
        ({"prompt": "p", "image_urls": [URL], "guidance_scale": 20.5}, "guidance_scale", "20"),
        ({"prompt": "p", "image_urls": [URL], "guidance_scale": -1}, "guidance_scale", "0"),
        (
            {"prompt": "p", "image_urls": [URL], "guidance_scale": math.nan},
            "guidance_scale",
            "finite",
        ),
        (
            {"prompt": "p", "image_urls": [URL], "guidance_scale": math.inf},
            "guidance_scale",
            "finite",
        ),
        (
            {"prompt": "p", "image_urls": [URL], "num_inference_steps": 3},
            "num_inference_steps",
            "4",
        ),
        (
            {"prompt": "p", "image_urls": [URL], "num_inference_steps": 51},
            "num_inference_steps",
            "50",
        ),
        ({"prompt": "p", "image_urls": [URL], "num_images": 0}, "num_images", "1"),
        ({"prompt": "p", "image_urls": [URL], "num_images": 5}, "num_images", "4"),
        ({"prompt": "p", "image_urls": [URL], "image_size": "huge"}, "image_size", "square_hd"),
        ({"prompt": "p", "image_urls": [URL], "output_format": "gif"}, "output_format", "png"),
        ({"prompt": "p", "image_urls": [URL], "seed": 1.5}, "seed", "integer"),
        ({"prompt": "p", "image_urls": [URL], "strength": 1}, "strength", "not a parameter"),
    ],
)
def test_each_violation_names_the_field_and_the_rule(
    data: dict[str, Any], field: str, words: str
) -> None:
    issues = issues_of(data)
    assert field in issues, issues
    assert words in issues[field]


@given(
    guidance=st.floats(allow_nan=True, allow_infinity=True),
    steps=st.integers(-100, 200),
    images=st.integers(-5, 10),
)
def test_numeric_bounds_hold_for_any_value(guidance: float, steps: int, images: int) -> None:
    data = {
        "prompt": "p",
        "image_urls": [URL],
        "guidance_scale": guidance,
        "num_inference_steps": steps,
        "num_images": images,
    }
    valid = (
        math.isfinite(guidance) and 0 <= guidance <= 20 and 4 <= steps <= 50 and 1 <= images <= 4
    )
    if valid:
        req = EditRequest.parse(data)
        assert (req.guidance_scale, req.num_inference_steps, req.num_images) == (
            guidance,
            steps,
            images,
        )
    else:
        with pytest.raises(InvalidEditRequest):
            EditRequest.parse(data)


@given(st.lists(st.sampled_from([URL, "http://a.test/b.jpg"]), min_size=1, max_size=8))
def test_any_number_of_urls_keeps_one_to_three(urls: list[str]) -> None:
    req = EditRequest.parse({"prompt": "p", "image_urls": urls})
    assert 1 <= len(req.image_urls) <= 3
    assert list(req.image_urls) == urls[:3]
    assert bool(req.warnings) == (len(urls) > 3)


def test_fingerprint_is_stable_and_sensitive() -> None:
    a = EditRequest.parse({"prompt": "p", "image_urls": URL})
    b = EditRequest.parse({"prompt": "p", "image_urls": [URL], "seed": 0})
    c = EditRequest.parse({"prompt": "p", "image_urls": URL, "seed": 1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_every_preset_has_a_pixel_size() -> None:
    assert IMAGE_SIZE_PIXELS["portrait_16_9"] == (576, 1024)
    assert len(IMAGE_SIZE_PIXELS) == 6


@pytest.mark.parametrize(
    ("raw", "state", "terminal"),
    [
        ("in_queue", JobState.IN_QUEUE, False),
        ("in_progress", JobState.IN_PROGRESS, False),
        ("completed", JobState.COMPLETED, True),
        ("cancelled", JobState.CANCELLED, True),
        ("failed", JobState.FAILED, True),
        ("COMPLETED", JobState.COMPLETED, True),
        (" in_queue ", JobState.IN_QUEUE, False),
        # RunComfy's own clients (CLI poll.rs, partner nodes execution.py) accept these too.
        ("succeeded", JobState.COMPLETED, True),
        ("Succeeded", JobState.COMPLETED, True),
        ("canceled", JobState.CANCELLED, True),
        ("pending", JobState.IN_QUEUE, False),
        ("waiting", JobState.IN_QUEUE, False),
        ("queued", JobState.IN_QUEUE, False),
        ("starting", JobState.IN_PROGRESS, False),
        ("processing", JobState.IN_PROGRESS, False),
    ],
)
def test_state_parser_knows_every_state(raw: str, state: JobState, terminal: bool) -> None:
    assert parse_state(raw) is state
    assert state.is_terminal is terminal


@pytest.mark.parametrize("raw", ["warming_up", "", None, "done", 3])
def test_state_parser_refuses_unknown_states(raw: Any) -> None:
    with pytest.raises(UnknownJobStateError):
        parse_state(raw, "rid")


def test_submit_and_status_shapes_ignore_unknown_fields() -> None:
    handle = parse_submit(
        {"request_id": "r1", "status_url": "s", "result_url": "r", "cancel_url": "c", "new": 1}
    )
    assert (handle.request_id, handle.status_url, handle.cancel_url) == ("r1", "s", "c")
    status = parse_status({"request_id": "r1", "status": "in_queue", "queue_position": 4, "x": 0})
    assert (status.state, status.queue_position) == (JobState.IN_QUEUE, 4)
    with pytest.raises(MalformedResponseError):
        parse_submit({"status_url": "s"})
    with pytest.raises(MalformedResponseError):
        parse_status(["not", "an", "object"])


@pytest.mark.parametrize(
    ("output", "urls"),
    [
        ({"image": "https://o/1.png"}, ("https://o/1.png",)),
        (
            {"images": ["https://o/1.png", "https://o/2.png"]},
            ("https://o/1.png", "https://o/2.png"),
        ),
        ({"images": [{"url": "https://o/1.png"}]}, ("https://o/1.png",)),
        (None, ()),
    ],
)
def test_result_output_shapes(output: Any, urls: tuple[str, ...]) -> None:
    result = parse_result(
        {
            "request_id": "r1",
            "status": "completed",
            "output": output,
            "error": None,
            "created_at": "2026-01-01T00:00:00Z",
            "finished_at": 1767225605,
            "cost_usd": 0.03,
        }
    )
    assert result.output_urls == urls
    assert result.ok is bool(urls)
    assert result.cost_usd == 0.03
    assert result.created_at is not None and result.created_at.year == 2026
    assert result.finished_at is not None and result.finished_at.tzinfo is not None
    if not urls:
        assert result.error == "the job completed without any output image"


def test_result_with_error_is_not_ok() -> None:
    result = parse_result(
        {
            "request_id": "r1",
            "status": "completed",
            "output": {"images": ["https://o/1.png"]},
            "error": {"error_code": "NSFW", "error_message": "blocked by the safety filter"},
        }
    )
    assert not result.ok
    assert result.error == "NSFW: blocked by the safety filter"


def test_cancel_outcomes() -> None:
    assert parse_cancel(
        {"request_id": "r", "status": "cancelled", "outcome": "cancelled"}
    ).cancelled
    refused = parse_cancel(
        {"request_id": "r", "status": "in_progress", "outcome": "not_cancellable"}
    )
    assert not refused.cancelled
    assert refused.state is JobState.IN_PROGRESS
