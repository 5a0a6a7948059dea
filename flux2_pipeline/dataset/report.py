"""What a dataset build holds: each partition's shards and counts, and the whole build's.

`build_training_dataset` fills these, the dataset card and the WebDataset export read them,
and `read_state`/`write_state` keep the builder's and the export's record between builds.

Example::

    report = build_training_dataset(sources, store, out_dir)
    report.rows, report.card_path, [p.key for p in report.partitions if p.rebuilt]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from upath import UPath

from flux2_pipeline.dataset.features import value_label
from flux2_pipeline.paths import write_bytes_atomically
from flux2_pipeline.runcomfy import PARAMETER_NAMES

CARD_FILE = "README.md"
SPLIT_DIR = "train"
"""The folder of the shards (files named after a split keyword would become splits)."""
COUNTED_COLUMNS = ("num_source_images", *PARAMETER_NAMES)
"""The columns whose distinct values the state file and the card count."""


@dataclass
class WebDatasetExport:
    """What `export_webdataset` wrote: every tar of the export, and which it rewrote."""

    out_dir: UPath
    tars: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass
class PartitionBuild:
    """What the dataset holds for one partition, and whether this build rewrote it."""

    key: str
    fingerprint: str
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    arrow_bytes: int = 0
    """Size of the rows in Arrow memory: what `datasets` calls the split's `num_bytes`."""
    skipped: int = 0
    value_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per parameter (and `num_source_images`): how many rows hold each value."""
    rebuilt: bool = False

    def count_values(self, example: dict[str, Any]) -> None:
        """Add one dataset row's parameter values to `value_counts`."""
        for name in COUNTED_COLUMNS:
            counts = self.value_counts.setdefault(name, {})
            label = value_label(example[name])
            counts[label] = counts.get(label, 0) + 1


@dataclass
class BuildReport:
    """The outcome of `build_training_dataset`."""

    out_dir: UPath
    partitions: list[PartitionBuild] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    webdataset: WebDatasetExport | None = None

    @property
    def card_path(self) -> UPath:
        """The dataset card, `README.md` at the dataset's root."""
        return self.out_dir / CARD_FILE

    @property
    def rows(self) -> int:
        """Rows in the whole dataset."""
        return sum(p.rows for p in self.partitions)

    @property
    def shards(self) -> int:
        """Shard files in the whole dataset."""
        return sum(len(p.shards) for p in self.partitions)

    @property
    def bytes(self) -> int:
        """Bytes of all shard files."""
        return sum(p.bytes for p in self.partitions)

    @property
    def arrow_bytes(self) -> int:
        """Size of all rows in Arrow memory (the train split's `num_bytes`)."""
        return sum(p.arrow_bytes for p in self.partitions)

    @property
    def skipped(self) -> int:
        """Edited images left out because they or their row's references are not stored."""
        return sum(p.skipped for p in self.partitions)

    @property
    def rebuilt(self) -> list[str]:
        """Keys of the partitions this build rewrote."""
        return [p.key for p in self.partitions if p.rebuilt]

    @property
    def value_counts(self) -> dict[str, dict[str, int]]:
        """Per parameter (and `num_source_images`): rows holding each value, all partitions.

        Columns in `COUNTED_COLUMNS` order, whichever order the state file kept them in.
        """
        total: dict[str, dict[str, int]] = {name: {} for name in COUNTED_COLUMNS}
        for build in self.partitions:
            for name, counts in build.value_counts.items():
                merged = total.setdefault(name, {})
                for label, count in counts.items():
                    merged[label] = merged.get(label, 0) + count
        return {name: counts for name, counts in total.items() if counts}


def read_state(path: UPath, table: str) -> dict[str, Any]:
    """The `table` object of the state file at `path`; empty when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    found = data.get(table) if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


def write_state(path: UPath, state: dict[str, Any]) -> None:
    """Replace the state file at `path` with `state` in one atomic write."""
    write_bytes_atomically(path, json.dumps(state, indent=1, sort_keys=True).encode())
