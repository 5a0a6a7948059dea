"""Syncing one partition's images in memory independent of its row count.

`sync_images_blocking` reads the references from a real results file in record batches,
looks the previous manifest up on disk, and streams the new manifest to the same path.
Each size runs in a fresh child process that reports its own peak RSS (VmHWM). No image
crosses the network: every reference and most edits are stored already (the previous
manifest lists them, all pointing at two small files), and one edit in ten points at a
private address the default policy refuses before any request, so it goes through a
download slot and fails at once. The peak at LARGE rows must stay within a fixed
allowance of the peak at SMALL rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flux2_pipeline.media import MANIFEST_SCHEMA, ImageStore, iter_manifest
from tests.helpers.tables import stored_png, write_completed_results

SMALL, LARGE = 10_000, 50_000
REFUSED_EVERY = 10
ALLOWANCE_MB = 10.0
"""Measured on 2026-11-24 (2 cores, load 9-11): +1.8 to +2.4 MB between these sizes
(207-209 -> 209-211 MB: the on-disk index's page cache filling up); with the references,
the previous manifest and every record held in lists, as before: +161.5 MB (223 -> 385 MB)."""
KEY = "big"

CHILD = """
import sys
from pathlib import Path
from flux2_pipeline.media import ImageStore, iter_image_refs, sync_images_blocking
from flux2_pipeline.paths import as_path, iter_parquet

root, key = Path(sys.argv[1]), sys.argv[2]
manifest = root / "flux2_images" / f"{key}.parquet"
refs = iter_image_refs(iter_parquet(as_path(root / "flux2_edits" / f"{key}.parquet")))
store = ImageStore(root / "images", base=root)
report = sync_images_blocking(refs, store, manifest, previous=manifest)
peak_kib = next(
    int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
)
print(report.stored, report.failed, report.reused, report.downloaded, report.bytes_stored,
      len(report.first_failures), peak_kib)
"""

pytestmark = pytest.mark.slow


def _edit_url(i: int) -> str:
    if i % REFUSED_EVERY == 0:
        return f"http://10.0.{i // 250 % 250}.{i % 250}/out-{i}.png"  # refused, no request
    return f"https://out.test/{i}.png"


def write_partition(root: Path, rows: int) -> int:
    """Completed rows with one reference and one edit each, and the previous manifest
    (every reference and every edit that can be stored, stored). Returns the bytes stored."""
    store = ImageStore(root / "images", base=root)
    source, edited = stored_png(store, 10), stored_png(store, 200)
    ids = [f"{KEY}-{i}" for i in range(rows)]
    results = {
        "row_id": ids,
        "prompt": [f"turn the scene into a watercolour, variant {i}" for i in range(rows)],
        "image_urls": [[f"https://ref.test/{i}.png"] for i in range(rows)],
        "request_id": [f"req-{i}" for i in range(rows)],
        "status": ["completed"] * rows,
        "output_urls": [[_edit_url(i)] for i in range(rows)],
        "attempts": [1] * rows,
    }
    write_completed_results(root / "flux2_edits" / f"{KEY}.parquet", results, rows)
    previous = [
        {"row_id": ids[i], "request_id": f"req-{i}", "role": role, "index": 0, "url": url}
        | (source if role == "source" else edited)
        | {"status": "ok"}
        for i in range(rows)
        for role, url in (("source", f"https://ref.test/{i}.png"), ("edited", _edit_url(i)))
        if not url.startswith("http://10.")
    ]
    manifest = root / "flux2_images" / f"{KEY}.parquet"
    manifest.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(previous, schema=MANIFEST_SCHEMA), manifest)
    return sum(len(store.read(str(image["path"]))) for image in (source, edited))


def sync_peak_mb(tmp_path: Path, rows: int) -> float:
    """Sync the images of a `rows`-row partition in a child process; its peak RSS in MB."""
    root = tmp_path / str(rows)
    bytes_stored = write_partition(root, rows)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), KEY], capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
    stored, failed, reused, downloaded, stored_bytes, examples, peak_kib = (
        int(part) for part in child.stdout.split()
    )
    refused = rows // REFUSED_EVERY
    assert (stored, failed, reused, downloaded) == (2 * rows - refused, refused, stored, 0)
    assert (stored_bytes, examples) == (bytes_stored, 5)
    manifest = root / "flux2_images" / f"{KEY}.parquet"
    written = [(r.row_id, r.role, r.status) for r in iter_manifest(manifest)]
    assert written == [
        (f"{KEY}-{i}", role, "failed" if role == "edited" and i % REFUSED_EVERY == 0 else "ok")
        for i in range(rows)
        for role in ("source", "edited")
    ]
    return peak_kib / 1024


def test_syncing_images_uses_the_same_memory_whatever_the_partition_size(
    tmp_path: Path,
) -> None:
    peaks = {rows: sync_peak_mb(tmp_path, rows) for rows in (SMALL, LARGE)}
    growth = peaks[LARGE] - peaks[SMALL]
    assert growth <= ALLOWANCE_MB, f"peak RSS {peaks}: +{growth:.1f} MB for 5x the rows"
