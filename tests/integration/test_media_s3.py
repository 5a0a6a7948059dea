"""s3:// reference images are stored from a real S3-compatible server (moto on loopback)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from flux2_pipeline.media import FetchLimits, ImageRef, ImageStore, read_manifest, sync_images
from flux2_pipeline.paths import as_path, write_bytes_atomically


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_s3_references_are_read_through_fsspec_under_the_size_cap(
    s3_bucket: str, tmp_path: Path
) -> None:
    small, big = png("red"), png("blue") + b"\0" * 5000
    write_bytes_atomically(as_path(f"s3://{s3_bucket}/refs/small.png"), small)
    write_bytes_atomically(as_path(f"s3://{s3_bucket}/refs/big.png"), big)
    store = ImageStore(tmp_path / "images", base=tmp_path)
    wanted = [
        ImageRef("a", "req-a", "source", 0, f"s3://{s3_bucket}/refs/small.png"),
        ImageRef("b", "req-b", "source", 0, f"s3://{s3_bucket}/refs/missing.png"),
        ImageRef("c", "req-c", "source", 0, f"s3://{s3_bucket}/refs/big.png"),
    ]
    manifest = tmp_path / "manifest.parquet"
    report = await sync_images(
        wanted, store, manifest, limits=FetchLimits(max_bytes=4000, attempts=1)
    )
    stored, missing, too_big = read_manifest(manifest)
    assert (report.stored, report.failed) == (1, 2)
    assert stored.ok and stored.sha256 == hashlib.sha256(small).hexdigest()
    assert stored.url == f"s3://{s3_bucket}/refs/small.png"
    assert store.read(stored.path or "") == small
    assert missing.error == f"unavailable: no such object: s3://{s3_bucket}/refs/missing.png"
    assert too_big.error == (
        f"too_large: {len(big)} bytes is more than the 4000-byte cap "
        f"(s3://{s3_bucket}/refs/big.png)"
    )
