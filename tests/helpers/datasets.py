"""A partition's results and images, as the training-dataset builder reads them.

Example:
    >>> source = partition_source(tmp_path, ImageStore(tmp_path / "images"), "cats", rows=3)
    >>> build_training_dataset([source], tmp_path / "dataset")
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flux2_pipeline.batch import RESULTS_SCHEMA
from flux2_pipeline.dataset import PartitionSource
from flux2_pipeline.media import ImageRecord, ImageStore, inspect_image, write_manifest


def shaded_png(seed: int) -> bytes:
    """A small PNG whose shade follows `seed`: different seeds, different bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (seed * 40 % 256, 80, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def partition_source(
    tmp: Path, store: ImageStore, key: str, rows: int, images: int = 1, references: int = 1
) -> PartitionSource:
    """Partition `key` as the edits and images steps leave it: results, manifest, images.

    Each of the `rows` rows has `references` source images and `images` edited ones, all
    stored in `store`; the files are written under `tmp`.
    """
    results, records = [], []
    for i in range(rows):
        row_id = f"{key}-{i}"
        refs = [f"https://ref.test/{key}/{i}/{r}.png" for r in range(references)]
        outs = [f"https://out.test/{key}/{i}/{n}.png" for n in range(images)]
        results.append(
            {
                "row_id": row_id,
                "prompt": f"prompt {key} {i}",
                "image_urls": refs,
                "guidance_scale": 2.5,
                "seed": i,
                "num_inference_steps": 28,
                "image_size": "square_hd",
                "num_images": images,
                "enable_prompt_expansion": False,
                "output_format": "png",
                "request_id": f"req-{key}-{i}",
                "status": "completed",
                "output_urls": outs,
                "error": None,
                "attempts": 1,
                "submitted_at": None,
                "finished_at": None,
                "cost_usd": None,
                "warning": None,
            }
        )
        for role, index, url, data in [
            ("source", r, ref, shaded_png(i + 50 * r)) for r, ref in enumerate(refs)
        ] + [("edited", n, url, shaded_png(100 + i * 7 + n)) for n, url in enumerate(outs)]:
            info = inspect_image(data)
            stored = store.put(data, info.sha256, info.ext)
            records.append(
                ImageRecord(
                    row_id,
                    f"req-{key}-{i}",
                    role,
                    index,
                    url,
                    "ok",
                    info.sha256,
                    stored.relative,
                    info.width,
                    info.height,
                    info.format,
                    info.bytes,
                )
            )
    results_path = tmp / "flux2_edits" / f"{key}.parquet"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(results, schema=RESULTS_SCHEMA), results_path)
    manifest_path = tmp / "flux2_images" / f"{key}.parquet"
    write_manifest(manifest_path, records)
    return PartitionSource(key, results_path, manifest_path)
