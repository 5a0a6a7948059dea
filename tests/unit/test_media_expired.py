"""Outputs whose URLs are gone: one `/result` per job, fresh URLs, else `expired`.

The API is the `refresh` callable (what `flux2_images` builds from the RunComfy client);
the image host is an `httpx.MockTransport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from flux2_pipeline.media import (
    EXPIRED,
    EXPIRED_ERROR,
    FetchLimits,
    ImageRef,
    ImageStore,
    SyncReport,
    read_manifest,
    sync_images,
)
from tests.helpers.images import png
from tests.helpers.net import LOOPBACK, to_loopback

GOOD = png()

HOST = "https://img.test"


def host(request: httpx.Request) -> httpx.Response:
    """Old output URLs answer 410; `/fresh/...` serves the image; `/refs/gone.png` 404s."""
    if request.url.path.startswith("/fresh/"):
        return httpx.Response(200, content=GOOD, headers={"content-type": "image/png"})
    if request.url.path == "/refs/gone.png":
        return httpx.Response(404)
    return httpx.Response(410, json={"error_code": "OUTPUT_EXPIRED"})


class Api:
    """The refresh callable: per request id, fresh URLs, None, or an error; counts calls."""

    def __init__(self, answers: dict[str, Sequence[str] | Exception | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, request_id: str) -> Sequence[str] | None:
        self.asked.append(request_id)
        answer = self.answers[request_id]
        if isinstance(answer, Exception):
            raise answer
        return answer


def outputs(request_id: str, count: int) -> list[ImageRef]:
    return [
        ImageRef(
            f"row-{request_id}", request_id, "edited", index, f"{HOST}/out/{request_id}/{index}"
        )
        for index in range(count)
    ]


async def sync(
    store: ImageStore, refs: list[ImageRef], manifest: Path, api: Api | None
) -> SyncReport:
    return await sync_images(
        refs,
        store,
        manifest,
        manifest,
        policy=LOOPBACK,
        resolver=to_loopback,
        transport=httpx.MockTransport(host),
        limits=FetchLimits(backoff_base=0.0),
        refresh=api,
    )


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", base=tmp_path)


async def test_fresh_urls_are_asked_once_per_job_and_recorded(
    store: ImageStore, tmp_path: Path
) -> None:
    api = Api({"a": [f"{HOST}/fresh/a/0?sig=SECRET", f"{HOST}/fresh/a/1?sig=SECRET"]})
    manifest = tmp_path / "m.parquet"
    report = await sync(store, outputs("a", 2), manifest, api)
    assert api.asked == ["a"]  # one /result for both of the job's outputs
    assert (report.stored, report.expired, report.failed, report.refreshed) == (2, 0, 0, 1)
    records = read_manifest(manifest)
    assert [r.status for r in records] == ["ok", "ok"]
    assert [r.url.split("?")[0] for r in records] == [f"{HOST}/fresh/a/0", f"{HOST}/fresh/a/1"]
    assert all("SECRET" not in r.url for r in records)  # a signed URL's secret is not kept

    again = await sync(store, outputs("a", 2), manifest, api)
    assert api.asked == ["a"] and (again.reused, again.downloaded) == (2, 0)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(["https://img.test/out/b/0"], id="the-same-url-still-gone"),
        pytest.param(None, id="no-result-any-more"),
        pytest.param([], id="no-output-urls"),
    ],
)
async def test_an_output_still_gone_is_expired(
    store: ImageStore, tmp_path: Path, answer: Sequence[str] | None
) -> None:
    api = Api({"b": answer})
    report = await sync(store, outputs("b", 1), tmp_path / "m.parquet", api)
    assert api.asked == ["b"]
    assert (report.expired, report.failed, report.stored) == (1, 0, 0)
    [record] = read_manifest(tmp_path / "m.parquet")
    assert (record.status, record.error) == (EXPIRED, EXPIRED_ERROR)
    assert record.url == f"{HOST}/out/b/0"
    assert report.first_expired == [record]


async def test_a_failed_ask_is_a_failure_naming_it_not_an_expiry(
    store: ImageStore, tmp_path: Path
) -> None:
    api = Api({"c": RuntimeError("the API answered 503")})
    report = await sync(store, outputs("c", 1), tmp_path / "m.parquet", api)
    [record] = read_manifest(tmp_path / "m.parquet")
    assert record.status == "failed" and report.failed == 1 and report.expired == 0
    assert record.error is not None
    assert "410" in record.error and "fresh URL failed: RuntimeError: the API answered 503" in (
        record.error
    )


async def test_references_and_syncs_without_an_api_are_never_refreshed(
    store: ImageStore, tmp_path: Path
) -> None:
    api = Api({})
    reference = ImageRef("row-r", "r", "source", 0, f"{HOST}/refs/gone.png")
    report = await sync(store, [reference], tmp_path / "m.parquet", api)
    assert api.asked == [] and report.failed == 1
    assert read_manifest(tmp_path / "m.parquet")[0].status == "failed"

    plain = await sync(store, outputs("d", 1), tmp_path / "n.parquet", None)
    assert (plain.failed, plain.expired) == (1, 0)
