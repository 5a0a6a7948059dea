"""The training dataset's rows again as WebDataset tar shards, for streaming trainers.

Optional (the `webdataset` extra): `build_training_dataset(..., webdataset_dir=...)` calls
`export_webdataset` after the Parquet shards are written. Each Parquet shard
`train/<partition>-<nnnnn>.parquet` becomes `<partition>-<nnnnn>.tar` in `webdataset_dir`,
with one sample per row:

    <key>.input_image.<ext>      the first reference (the same bytes as `input_image`)
    <key>.edited_image.<ext>     the edited image
    <key>.source_<i>.<ext>       every reference, in order
    <key>.edit_prompt.txt        the instruction
    <key>.json                   every other column (parameters, lineage, sizes)

`webdataset_dir` must not be inside the Parquet dataset's folder: `datasets` would take the
tar files for data files of the Parquet dataset. A tar is rewritten only when its partition's
fingerprint changed (kept in a hidden state file written last), so an interrupted export
is redone next time; tars of shards that are gone are deleted.

Example::

    import webdataset as wds
    for sample in wds.WebDataset("out/flux2_training_dataset_wds/cats-00000.tar").decode("pil"):
        sample["input_image.png"], sample["edit_prompt.txt"], sample["edited_image.png"]
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from upath import UPath

from flux2_pipeline.dataset.report import PartitionBuild, WebDatasetExport, read_state, write_state
from flux2_pipeline.paths import atomic_writer, iter_parquet, make_dirs

WDS_STATE_FILE = ".flux2_webdataset_state.json"
_IMAGE_COLUMNS = ("input_image", "edited_image", "source_images")
_TEXT_COLUMNS = ("edit_prompt",)
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
TAR_BATCH_ROWS = 64
"""Shard rows read at a time: each carries its images' bytes (the builder's row groups)."""


def sample_key(shard_stem: str, position: int) -> str:
    """A WebDataset key for a row: no dots (they split key from field), unique per export.

    Characters other than letters, digits, `_` and `-` become `_`, and then a short hash of
    the original stem keeps two partitions apart:

    >>> sample_key("cats-00001", 7), sample_key("cats.v2-00001", 7)
    ('cats-00001-000007', 'cats_v2-00001-5cb2bb64-000007')
    """
    safe = _UNSAFE_KEY.sub("_", shard_stem)
    if safe != shard_stem:
        safe += "-" + hashlib.sha256(shard_stem.encode()).hexdigest()[:8]
    return f"{safe}-{position:06d}"


def _extension(cell: dict[str, Any]) -> str:
    return PurePosixPath(str(cell.get("path") or "image.png")).suffix.lstrip(".") or "png"


def sample_of(row: dict[str, Any], key: str) -> dict[str, Any]:
    """One dataset row as a WebDataset sample (field name -> bytes, str or dict)."""
    sample: dict[str, Any] = {"__key__": key}
    sample[f"input_image.{_extension(row['input_image'])}"] = row["input_image"]["bytes"]
    sample[f"edited_image.{_extension(row['edited_image'])}"] = row["edited_image"]["bytes"]
    for index, cell in enumerate(row["source_images"]):
        sample[f"source_{index}.{_extension(cell)}"] = cell["bytes"]
    sample["edit_prompt.txt"] = row["edit_prompt"]
    sample["json"] = {
        name: value
        for name, value in row.items()
        if name not in _IMAGE_COLUMNS and name not in _TEXT_COLUMNS
    }
    return sample


def _write_tar(parquet: UPath, target: UPath) -> None:
    import webdataset  # type: ignore[import-untyped]  # an optional dependency

    stem = parquet.name.removesuffix(".parquet")
    with atomic_writer(target) as handle:
        # mtime fixed: the same rows give the same tar bytes.
        writer = webdataset.TarWriter(handle, mtime=0.0)
        position = 0
        for batch in iter_parquet(parquet, batch_rows=TAR_BATCH_ROWS):
            for row in batch.to_pylist():
                writer.write(sample_of(row, sample_key(stem, position)))
                position += 1
        writer.close()


def export_webdataset(
    builds: Sequence[PartitionBuild], parquet_dir: UPath, out_dir: UPath
) -> WebDatasetExport:
    """Bring the tar shards in `out_dir` up to date with the Parquet shards in `parquet_dir`."""
    if importlib.util.find_spec("webdataset") is None:
        raise RuntimeError(
            "webdataset export: the webdataset library is not installed "
            "(pip install 'flux2-pipeline[webdataset]')"
        )
    make_dirs(out_dir)
    state = {str(k): str(v) for k, v in read_state(out_dir / WDS_STATE_FILE, "tars").items()}
    export = WebDatasetExport(out_dir)
    current: dict[str, str] = {}
    for build in builds:
        for shard in build.shards:
            tar = shard.removesuffix(".parquet") + ".tar"
            made_from = f"{build.fingerprint}:{shard}"
            current[tar] = made_from
            export.tars.append(tar)
            if state.get(tar) == made_from and (out_dir / tar).exists():
                continue
            _write_tar(parquet_dir / shard, out_dir / tar)
            export.rewritten.append(tar)
    try:
        present = [path for path in out_dir.iterdir() if path.name]
    except FileNotFoundError:  # an object-store prefix that holds nothing yet
        present = []
    for path in present:
        if path.name.endswith((".tar", ".tmp")) and path.name not in current:
            path.unlink(missing_ok=True)
            if path.name.endswith(".tar"):
                export.removed.append(path.name)
    write_state(out_dir / WDS_STATE_FILE, {"tars": current})
    return export
