"""Asset checks on `flux2_images`, read back from the manifest and the stored files.

Example: each partition of flux2_images shows these two checks in the Dagster UI;
`flux2-pipeline materialize` runs them right after the asset.
"""

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    DynamicPartitionsDefinition,
    asset_check,
)

from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.ranges import check_each_partition
from flux2_pipeline.media import (
    ImageRecord,
    ImageStore,
    ManifestIndex,
    UndecodableImage,
    completed_rows,
    inspect_image,
    iter_manifest,
)
from flux2_pipeline.paths import DiskIndex, iter_parquet
from flux2_pipeline.resources import Flux2Storage
from flux2_pipeline.runcomfy.models import IMAGE_SIZE_PIXELS

EXAMPLES = 5


def _problem(store: ImageStore, path: str | None, sha256: str | None) -> str | None:
    if path is None or not store.exists(path):
        return "file missing"
    try:
        info = inspect_image(store.read(path))
    except UndecodableImage as exc:
        return str(exc)
    return None if info.sha256 == sha256 else "bytes changed since stored (sha256 differs)"


class _Findings:
    """How many problems were found, and the first `EXAMPLES` of them: bounded at any count."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(text)


def _edited_problems(
    rows: Iterable[dict[str, Any]], manifest: ManifestIndex, store: ImageStore
) -> tuple[int, _Findings]:
    """Edited images the completed `rows` expect, and those missing or broken."""
    problems = _Findings()
    expected = 0
    for row in rows:
        row_id = row["row_id"]
        for index in range(len(row["output_urls"])):
            expected += 1
            record = manifest.get(row_id, "edited", index)
            if record is None:
                problem: str | None = "not in the manifest"
            elif not record.ok:
                problem = record.error or "failed"
            else:
                problem = _problem(store, record.path, record.sha256)
            if problem:
                problems.add(f"{row_id}[{index}]: {problem}")
    return expected, problems


def _size_mismatches(records: Iterable[ImageRecord], presets: DiskIndex) -> tuple[int, _Findings]:
    """Stored edited images checked, and those whose size is not their row's preset's."""
    mismatched = _Findings()
    checked = 0
    for record in records:
        if record.role != "edited" or not record.ok:
            continue
        checked += 1
        preset = presets.get((record.row_id,))
        want = IMAGE_SIZE_PIXELS.get(preset or "")
        got = (record.width, record.height)
        if want is None or got != want:
            mismatched.add(
                f"{record.row_id}[{record.index}]: {got[0]}x{got[1]}, {preset} is "
                + (f"{want[0]}x{want[1]}" if want else "not a known preset")
            )
    return checked, mismatched


def build_images_checks(
    keys: Flux2Keys, partitions_def: DynamicPartitionsDefinition
) -> list[AssetChecksDefinition]:
    """The checks on flux2_images, one result per partition."""

    @asset_check(
        asset=keys.images,
        required_resource_keys={keys.resource("storage")},
        name="edited_images_stored",
        partitions_def=partitions_def,
        description="Every completed row has all its edited images stored and decodable (ERROR).",
    )
    def edited_images_stored(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))

        def evaluate(key: str) -> AssetCheckResult:
            columns = ["row_id", "status", "output_urls"]
            rows = completed_rows(iter_parquet(storage.results_path(key), columns), columns)
            store = ImageStore(storage.images_dir(), base=storage.output_root())
            with ManifestIndex(storage.image_manifest_path(key)) as manifest:
                expected, problems = _edited_problems(rows, manifest, store)
            return AssetCheckResult(
                passed=not problems.count,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "edited_images_expected": expected,
                    "missing_or_broken": problems.count,
                    "examples": "; ".join(problems.examples),
                },
            )

        return check_each_partition(context, evaluate)

    @asset_check(
        asset=keys.images,
        required_resource_keys={keys.resource("storage")},
        name="edited_image_sizes_match_preset",
        partitions_def=partitions_def,
        description="Edited images have the pixel size of the requested image_size preset (WARN).",
    )
    def edited_image_sizes_match_preset(context: AssetCheckExecutionContext) -> AssetCheckResult:
        storage: Flux2Storage = getattr(context.resources, keys.resource("storage"))

        def evaluate(key: str) -> AssetCheckResult:
            with DiskIndex() as presets:
                presets.put_all(
                    ((row_id,), size)
                    for batch in iter_parquet(storage.results_path(key), ["row_id", "image_size"])
                    for row_id, size in zip(
                        batch["row_id"].to_pylist(), batch["image_size"].to_pylist(), strict=True
                    )
                )
                try:
                    checked, mismatched = _size_mismatches(
                        iter_manifest(storage.image_manifest_path(key)), presets
                    )
                except (pa.ArrowException, OSError):
                    checked, mismatched = 0, _Findings()  # a damaged manifest lists nothing
            return AssetCheckResult(
                passed=not mismatched.count,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "edited_images_checked": checked,
                    "mismatched": mismatched.count,
                    "examples": "; ".join(mismatched.examples),
                },
            )

        return check_each_partition(context, evaluate)

    return [edited_images_stored, edited_image_sizes_match_preset]
