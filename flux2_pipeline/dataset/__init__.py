"""The training dataset: Hugging Face-loadable sharded Parquet built from stored images.

Dagster-free. `build_training_dataset` turns every partition's results table and image
manifest into shards of one row per edited image, with the images embedded in the
Hugging Face encoding and the `datasets` Features in the Parquet metadata, and writes the
dataset card (`README.md`) beside them.

Example::

    report = build_training_dataset(sources, store, Path("out/flux2_training_dataset"))
    datasets.load_dataset("parquet", data_dir="out/flux2_training_dataset", split="train")
"""

from flux2_pipeline.dataset.builder import (
    MAX_SHARD_BYTES,
    MAX_SHARD_ROWS,
    STATE_FILE,
    PartitionSource,
    build_training_dataset,
)
from flux2_pipeline.dataset.card import (
    load_snippet,
    render_card,
    storage_options,
    yaml_features,
)
from flux2_pipeline.dataset.features import (
    COLUMN_DESCRIPTIONS,
    COLUMNS,
    DATASET_SCHEMA,
    FEATURES,
    IMAGE_TYPE,
    TRAINER_COLUMNS,
    Column,
    parameter_column,
)
from flux2_pipeline.dataset.report import CARD_FILE, SPLIT_DIR, BuildReport, PartitionBuild

__all__ = [
    "CARD_FILE",
    "COLUMNS",
    "COLUMN_DESCRIPTIONS",
    "DATASET_SCHEMA",
    "FEATURES",
    "IMAGE_TYPE",
    "MAX_SHARD_BYTES",
    "MAX_SHARD_ROWS",
    "SPLIT_DIR",
    "STATE_FILE",
    "TRAINER_COLUMNS",
    "BuildReport",
    "Column",
    "PartitionBuild",
    "PartitionSource",
    "build_training_dataset",
    "load_snippet",
    "parameter_column",
    "render_card",
    "storage_options",
    "yaml_features",
]
