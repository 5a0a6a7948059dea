"""`flux2_training_dataset`: one Hugging Face-loadable dataset across every partition.

Unpartitioned, downstream of every partition of `flux2_images`. It (re)builds
`$FLUX2_OUTPUT_DIR/flux2_training_dataset/` from each registered partition that has both a
results table and an image manifest, rewriting only partitions whose inputs changed and
removing those that are gone (see `flux2_pipeline.dataset.builder`).

Example::

    flux2-pipeline materialize --select flux2_training_dataset
    python -c "import datasets; print(datasets.load_dataset('parquet',
        data_dir='data/output/flux2_training_dataset', split='train'))"
"""

import json
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)
from upath import UPath

from flux2_pipeline.assets.hooks import ExecuteHook, with_execute
from flux2_pipeline.assets.keys import Flux2Keys
from flux2_pipeline.assets.metadata import DatasetMetadata
from flux2_pipeline.assets.uri import URI, storage_uri
from flux2_pipeline.dataset import (
    COLUMN_DESCRIPTIONS,
    DATASET_SCHEMA,
    FEATURES,
    PartitionSource,
    build_training_dataset,
    load_snippet,
)
from flux2_pipeline.media import ImageStore
from flux2_pipeline.resources import Flux2Storage

DATASET_CODE_VERSION = "2"
FOLLOWS_IMAGES = (
    (AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated())
    .since_last_handled()
    .with_label("any partition's images updated")
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
)
"""Rebuild after any partition's images update, once none is still in progress.

Like `AutomationCondition.eager()` without its "no dependency missing" clause: one failed
or not yet materialized partition must not hold back every other partition's rows.
"""


def dataset_table_schema() -> TableSchema:
    """The training dataset's columns as a Dagster `TableSchema`."""
    return TableSchema(
        columns=[
            TableColumn(
                name=column.name,
                type=str(column.type),
                description=COLUMN_DESCRIPTIONS.get(column.name),
            )
            for column in DATASET_SCHEMA
        ]
    )


def _load_example(out_dir: UPath) -> str:
    return f'```python\n{load_snippet(out_dir)}\nds[0]["edited_image"]  # a PIL image\n```'


def build_dataset_asset(
    keys: Flux2Keys, *, group_name: str = "flux2", execute: ExecuteHook | None = None
) -> AssetsDefinition:
    """The flux2_training_dataset asset (unpartitioned, across every partition).

    Use `build_flux2_definitions`, which names it; this builds the asset alone.
    """
    storage_key = keys.resource("storage")

    @asset(
        key=keys.training_dataset,
        deps=[keys.images],
        group_name=group_name,
        automation_condition=FOLLOWS_IMAGES,
        required_resource_keys={storage_key},
        code_version=DATASET_CODE_VERSION,
        kinds={"parquet"},
        metadata={"dagster/column_schema": dataset_table_schema()},
        description="Training dataset across all partitions: one row per edited image with its "
        "input_image, edit_prompt and edited_image (diffusers' instruct-pix2pix columns), every "
        "reference image, effective parameters and lineage; sharded Parquet that "
        "datasets.load_dataset('parquet', data_dir=...) loads with images decoded, with a "
        "dataset card (README.md) at its root.",
    )
    @with_execute("flux2_training_dataset", execute)
    def flux2_training_dataset(context: AssetExecutionContext) -> MaterializeResult[None]:
        """Rebuild the changed partitions' shards of the training dataset."""
        storage: Flux2Storage = getattr(context.resources, storage_key)
        sources = []
        for key in sorted(context.instance.get_dynamic_partitions(keys.partitions_name)):
            results, manifest = storage.results_path(key), storage.image_manifest_path(key)
            # A deleted input file takes its rows out: the builder drops shards of
            # partitions it is not given, though the partition and its results remain.
            if storage.input_path(key).is_file() and results.is_file() and manifest.is_file():
                sources.append(PartitionSource(key, results, manifest))
        out_dir = storage.training_dataset_dir()
        store = ImageStore(storage.images_dir(), base=storage.output_root())
        report = build_training_dataset(sources, store, out_dir, input_dir=storage.input_dir)
        context.log.info(
            f"training dataset: {report.rows} rows in {report.shards} shards from "
            f"{len(report.partitions)} partitions; rewrote {', '.join(report.rebuilt) or 'none'}"
        )
        metadata: dict[str, Any] = {
            "dagster/row_count": report.rows,
            "dagster/column_schema": dataset_table_schema(),
            **DatasetMetadata(
                shards=report.shards,
                bytes=report.bytes,
                partitions=MetadataValue.json([p.key for p in report.partitions]),
                partitions_rebuilt=MetadataValue.json(report.rebuilt),
                partitions_removed=MetadataValue.json(report.removed),
                images_skipped=report.skipped,
                path=MetadataValue.path(str(out_dir)),
                features=MetadataValue.json(FEATURES),
                features_md=MetadataValue.md(
                    "```json\n" + json.dumps(FEATURES, indent=1) + "\n```"
                ),
                load=MetadataValue.md(_load_example(out_dir)),
                card=MetadataValue.path(str(report.card_path)),
                value_counts=MetadataValue.json(report.value_counts),
            ),
            URI: storage_uri(out_dir),
        }
        return MaterializeResult(metadata=metadata)

    return flux2_training_dataset
