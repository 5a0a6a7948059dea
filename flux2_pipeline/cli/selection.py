"""What a backfill runs: which assets (`--select`) and which partitions (`--partition`,
`--retry-failed`), resolved against the `Definitions` and the instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetKey, AssetPartitionStatus, DagsterInstance, Definitions

from flux2_pipeline.assets import Flux2Keys, register_input_files
from flux2_pipeline.resources import Flux2Storage, InputScan
from flux2_pipeline.settings import SettingsError


@dataclass(frozen=True)
class Selection:
    """The selected assets in dependency order, partitioned and not."""

    partitioned: list[AssetKey]
    unpartitioned: list[AssetKey]
    explicit: bool
    """The user named them (`--select`), rather than taking every asset."""


def select_assets(defs: Definitions, names: Sequence[str]) -> Selection:
    """The materializable assets named (every one when `names` is empty).

    Raises `SettingsError` for a name the `Definitions` do not have.
    """
    graph = defs.resolve_asset_graph()
    materializable = {
        key.to_user_string(): key
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_materializable
    }
    unknown = [name for name in names if name not in materializable]
    if unknown:
        raise SettingsError(
            f"--select: unknown asset {unknown[0]!r} (choose from {', '.join(materializable)})"
        )
    chosen = [materializable[name] for name in (names or materializable)]
    ordered = [key for key in graph.toposorted_asset_keys if key in chosen]
    return Selection(
        partitioned=[k for k in ordered if graph.get(k).partitions_def is not None],
        unpartitioned=[k for k in ordered if graph.get(k).partitions_def is None],
        explicit=bool(names),
    )


def input_file_count(storage: Flux2Storage) -> int:
    """How many tables the input folder holds, without reading any (a guess at the runs)."""
    if storage.input_is_remote:
        return len(storage.scan_inputs().found)  # one listing call
    return sum(1 for _ in Path(storage.input_dir).glob("*.parquet"))


def chosen_partitions(
    instance: DagsterInstance, storage: Flux2Storage, names: Sequence[str]
) -> tuple[list[str], InputScan]:
    """The partitions named (every input file's when `names` is empty), and the scan.

    Every input file becomes a partition first, with the sensor's own code. Raises
    `SettingsError` for a name without an input file or one that cannot be a partition.
    """
    scan = register_input_files(instance, Flux2Keys(), storage)
    for key in names:
        if f"{key}.parquet" in scan.skipped:
            raise SettingsError(
                f"--partition: {key}.parquet cannot be a partition: its name "
                f"{scan.skipped[f'{key}.parquet']}; rename the file"
            )
        if key not in scan.found:
            raise SettingsError(f"--partition: no input file {key}.parquet in {storage.input_dir}")
    return list(names) or list(scan.found), scan


def failed_partitions(
    instance: DagsterInstance, defs: Definitions, keys: Sequence[str], assets: Sequence[AssetKey]
) -> list[str]:
    """The partitions that a run left unfinished: failed, or done for some of `assets` only.

    A partition is unfinished when any of the assets failed on it, or when one asset has
    it materialized and another not (a ranged run whose step failed for a neighbour
    skips the steps after it for the whole range).
    """
    graph = defs.resolve_asset_graph()
    statuses = []
    for asset in assets:
        partitions_def = graph.get(asset).partitions_def
        assert partitions_def is not None, "only partitioned assets have failed partitions"
        statuses.append(instance.get_status_by_partition(asset, keys, partitions_def) or {})
    unfinished = []
    for key in keys:
        seen = [status.get(key) for status in statuses]
        if AssetPartitionStatus.FAILED in seen or (
            AssetPartitionStatus.MATERIALIZED in seen and None in seen
        ):
            unfinished.append(key)
    return unfinished
