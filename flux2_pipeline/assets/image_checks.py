"""Asset checks on `flux2_images`, read back from the manifest and the stored files.

Example: each partition of flux2_images shows these two checks in the Dagster UI;
`flux2-pipeline materialize` runs them right after the asset.
"""

import pyarrow.compute as pc
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
from flux2_pipeline.media import ImageStore, UndecodableImage, inspect_image, read_manifest
from flux2_pipeline.paths import read_parquet
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
            results = read_parquet(
                storage.results_path(key), columns=["row_id", "status", "output_urls"]
            )
            completed = results.filter(pc.equal(results["status"], "completed"))
            store = ImageStore(storage.images_dir(), base=storage.output_root())
            edited = {
                (r.row_id, r.index): r
                for r in read_manifest(storage.image_manifest_path(key))
                if r.role == "edited"
            }
            problems: list[str] = []
            expected = 0
            for row_id, urls in zip(
                completed["row_id"].to_pylist(), completed["output_urls"].to_pylist(), strict=True
            ):
                for index in range(len(urls)):
                    expected += 1
                    record = edited.get((row_id, index))
                    if record is None:
                        problem: str | None = "not in the manifest"
                    elif not record.ok:
                        problem = record.error or "failed"
                    else:
                        problem = _problem(store, record.path, record.sha256)
                    if problem:
                        problems.append(f"{row_id}[{index}]: {problem}")
            return AssetCheckResult(
                passed=not problems,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "edited_images_expected": expected,
                    "missing_or_broken": len(problems),
                    "examples": "; ".join(problems[:EXAMPLES]),
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
            results = read_parquet(storage.results_path(key), columns=["row_id", "image_size"])
            presets = dict(
                zip(results["row_id"].to_pylist(), results["image_size"].to_pylist(), strict=True)
            )
            mismatched: list[str] = []
            checked = 0
            for record in read_manifest(storage.image_manifest_path(key)):
                if record.role != "edited" or not record.ok:
                    continue
                checked += 1
                preset = presets.get(record.row_id)
                want = IMAGE_SIZE_PIXELS.get(preset or "")
                got = (record.width, record.height)
                if want is None or got != want:
                    mismatched.append(
                        f"{record.row_id}[{record.index}]: {got[0]}x{got[1]}, {preset} is "
                        + (f"{want[0]}x{want[1]}" if want else "not a known preset")
                    )
            return AssetCheckResult(
                passed=not mismatched,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "edited_images_checked": checked,
                    "mismatched": len(mismatched),
                    "examples": "; ".join(mismatched[:EXAMPLES]),
                },
            )

        return check_each_partition(context, evaluate)

    return [edited_images_stored, edited_image_sizes_match_preset]
