"""Camera photos through `flux2-pipeline materialize`, in bounded memory; bombs still harmless.

The real command runs as a subprocess against the emulator: 12 rows whose references are
8000x6000 PNGs (48 MP, what phones and cameras write), two of them with a second, 12000x8500
reference (102 MP, a medium-format camera), through edits, images and the training dataset.
Every reference must be stored with its real size, the dataset must have the 12 rows, the
contact sheet must show real thumbnails, and the whole command's peak RSS (every process
it starts included) must stay within 1 GiB. Six 9400x9400 PNG bombs (343 KB each, 88 MP
of zeros) go through the same command within the same bound.

The references are served from a loopback HTTP server (the emulator fetches them by URL,
as RunComfy does). They are mostly flat colour with sparse noise, so a 48 MP PNG is ~3 MB.

Peak RSS: the command runs under a small wrapper process that makes itself the subreaper
of everything the command starts (the worker server and its workers included), waits for
all of them, and reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`: the largest peak among
them. The wrapper is a fresh interpreter, so no figure includes the test process.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.media.contact import PAD, TEXT_WIDTH, THUMB
from tests.helpers.cli import CLI
from tests.helpers.emulator import TEST_TOKEN, emulator_config
from tests.helpers.images import pixel_bomb
from tests.helpers.tables import write_table

pytestmark = pytest.mark.slow

PEAK_LIMIT_MB = 1024.0
PHOTOS = 12
PHOTO_SIZE = (8000, 6000)
LARGE_SIZE = (12000, 8500)
LARGE_ROWS = 2
BOMBS = 6
BOMB_SIDE = 9400

WRAPPER = """
import ctypes, json, os, resource, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
code = subprocess.call(sys.argv[1:])
while True:  # reap what the command left behind, so its usage is counted too
    try:
        os.wait()
    except ChildProcessError:
        break
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "max_rss_kib": usage.ru_maxrss}), file=sys.stderr)
sys.exit(code)
"""


def photo_colour(seed: int) -> tuple[int, int, int]:
    red, green, blue = np.random.default_rng(seed).integers(30, 220, 3, dtype=np.uint8)
    return int(red), int(green), int(blue)


def photo_png(size: tuple[int, int], seed: int) -> bytes:
    """A flat colour with sparse noise: a real RGB photo's size, a few MB on disk."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = rng.integers(30, 220, 3, dtype=np.uint8)  # photo_colour(seed)
    count = width * height // 400
    ys, xs = rng.integers(0, height, count), rng.integers(0, width, count)
    pixels[ys, xs] = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def reference_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos and bombs, made once per session."""
    folder = tmp_path_factory.mktemp("camera-references")
    for i in range(PHOTOS):
        (folder / f"photo-{i}.png").write_bytes(photo_png(PHOTO_SIZE, i))
    for i in range(LARGE_ROWS):
        (folder / f"large-{i}.png").write_bytes(photo_png(LARGE_SIZE, 100 + i))
    bomb = pixel_bomb(BOMB_SIDE, BOMB_SIDE)
    for i in range(BOMBS):  # six URLs, as six rows of a hostile table would send
        (folder / f"bomb-{i}.png").write_bytes(bomb)
    return folder


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def reference_server(reference_files: Path) -> Iterator[str]:
    """A loopback HTTP server for the reference files; its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(reference_files))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def module_emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(emulator_config()) as server:
        yield server


def materialize(workdir: Path, emulator: EmulatorServer) -> tuple[int, str, float]:
    """Run `flux2-pipeline materialize` under the wrapper: exit code, output, peak RSS (MB)."""
    home = workdir / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "FLUX2_", "DAGSTER_"))
    }
    env.update(
        RUNCOMFY_BASE_URL=emulator.base_url,
        RUNCOMFY_API_TOKEN=TEST_TOKEN,
        FLUX2_INPUT_DIR=str(workdir / "prompts"),
        FLUX2_OUTPUT_DIR=str(workdir / "output"),
        FLUX2_STEP_RETRIES="0",
        DAGSTER_HOME=str(home),
    )
    child = subprocess.run(
        [sys.executable, "-c", WRAPPER, CLI, "materialize"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = json.loads(child.stderr.strip().splitlines()[-1])
    return report["code"], child.stdout + child.stderr, report["max_rss_kib"] / 1024


def manifest_rows(workdir: Path, key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(
        workdir / "output" / "flux2_images" / f"{key}.parquet"
    ).to_pylist()
    return rows


def dataset_rows(workdir: Path) -> list[dict[str, Any]]:
    folder = workdir / "output" / "flux2_training_dataset" / "train"
    table = pads.dataset(sorted(folder.glob("*.parquet")), format="parquet").to_table()
    rows: list[dict[str, Any]] = table.select(
        ["row_id", "input_image", "source_images"]
    ).to_pylist()
    return rows


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_camera_photos_are_stored_and_verified_in_bounded_memory(
    tmp_path: Path, reference_files: Path, reference_server: str, module_emulator: EmulatorServer
) -> None:
    rows = [
        {
            "id": f"photo-{i}",
            "prompt": f"make photo {i} look like a watercolour",
            "image_urls": [f"{reference_server}/photo-{i}.png"]
            + ([f"{reference_server}/large-{i}.png"] if i < LARGE_ROWS else []),
            "seed": i,
        }
        for i in range(PHOTOS)
    ]
    write_table(tmp_path / "prompts", "camera", rows)
    code, output, peak_mb = materialize(tmp_path, module_emulator)
    assert code == 0, output[-4000:]

    manifest = manifest_rows(tmp_path, "camera")
    assert [r["status"] for r in manifest] == ["ok"] * len(manifest), manifest
    sources = {(r["row_id"], r["index"]): r for r in manifest if r["role"] == "source"}
    assert len(sources) == PHOTOS + LARGE_ROWS
    for (row_id, index), record in sources.items():
        name = f"{'large' if index else 'photo'}-{row_id.split('-')[1]}.png"
        expected = LARGE_SIZE if index else PHOTO_SIZE
        assert (record["width"], record["height"]) == expected, record
        assert (record["format"], record["verified"], record["note"]) == ("PNG", "png-stream", None)
        assert record["sha256"] == sha256((reference_files / name).read_bytes())
        assert (tmp_path / "output" / record["path"]).stat().st_size == record["bytes"]
    assert sum(r["role"] == "edited" for r in manifest) == PHOTOS

    dataset = dataset_rows(tmp_path)
    assert sorted(r["row_id"] for r in dataset) == sorted(f"photo-{i}" for i in range(PHOTOS))
    for row in dataset:  # the references are embedded as they are, byte for byte
        number = row["row_id"].split("-")[1]
        original = (reference_files / f"photo-{number}.png").read_bytes()
        assert sha256(row["input_image"]["bytes"]) == sha256(original)
        assert len(row["source_images"]) == (2 if int(number) < LARGE_ROWS else 1)

    with Image.open(tmp_path / "output" / "flux2_images" / "camera.contact.png") as sheet:
        assert sheet.width > 0 and sheet.height > 0
        assert_thumbnails_show_the_photos(sheet)
    assert peak_mb <= PEAK_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"camera photos: peak RSS {peak_mb:.0f} MB")


def assert_thumbnails_show_the_photos(sheet: Image.Image) -> None:
    """Each row's reference cells have their photo's colour (not a failure cell)."""
    header = 14 + 2 * PAD
    for row in range(PHOTOS):
        top = header + row * (THUMB + 2 * PAD)
        columns = [(0, row)] + ([(1, 100 + row)] if row < LARGE_ROWS else [])
        for column, seed in columns:
            x = PAD + TEXT_WIDTH + column * (THUMB + PAD) + THUMB // 2
            shown = sheet.getpixel((x, top + THUMB // 4))
            assert shown == pytest.approx(photo_colour(seed), abs=12), (row, column, shown)


def test_six_png_bombs_go_through_within_the_same_bound(
    tmp_path: Path, reference_server: str, module_emulator: EmulatorServer
) -> None:
    rows = [
        {
            "id": f"bomb-{i}",
            "prompt": f"bomb {i}",
            "image_urls": [f"{reference_server}/bomb-{i}.png"],
            "seed": i,
        }
        for i in range(BOMBS)
    ]
    write_table(tmp_path / "prompts", "bombs", rows)
    code, output, peak_mb = materialize(tmp_path, module_emulator)
    assert code == 0, output[-4000:]
    sources = [r for r in manifest_rows(tmp_path, "bombs") if r["role"] == "source"]
    assert [(r["status"], r["width"], r["height"]) for r in sources] == [
        ("ok", BOMB_SIDE, BOMB_SIDE)
    ] * BOMBS
    assert len(dataset_rows(tmp_path)) == BOMBS
    with Image.open(tmp_path / "output" / "flux2_images" / "bombs.contact.png") as sheet:
        assert sheet.width > 0 and sheet.height > 0
        shown = sheet.getpixel((PAD + TEXT_WIDTH + THUMB // 2, 14 + 2 * PAD + THUMB // 4))
        assert shown == (0, 0, 0)  # the bomb's thumbnail: zero pixels, decoded under the budget
    assert peak_mb <= PEAK_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"png bombs: peak RSS {peak_mb:.0f} MB")
