"""`Flux2Storage`: where input tables are read and datasets are written.

Example::

    storage = Flux2Storage(input_dir="data/prompts", output_dir="data/output")
    storage.input_path("cats")      # data/prompts/cats.parquet
    storage.results_path("cats")    # data/output/flux2_edits/cats.parquet
    storage.image_manifest_path("cats")  # data/output/flux2_images/cats.parquet

`output_dir` may be an object-store URI (`s3://bucket/prefix`, the `s3` extra, credentials
from the usual AWS_* variables): the output paths are `UPath`s (see `flux2_pipeline.paths`),
local folders absolute paths. Inputs stay local. A file whose stem cannot be a Dagster
partition key is not a partition; `scan_inputs` says why (see `partition_key_problem`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dagster import ConfigurableResource
from pydantic import Field, field_validator
from upath import UPath

from flux2_pipeline.media import DEFAULT_MAX_PIXELS
from flux2_pipeline.paths import as_path, is_remote_uri

MAX_KEY_LENGTH = 200
_FORBIDDEN_IN_KEYS = {
    "...": "'...', which Dagster reserves for partition ranges",
    ",": "',', which Dagster uses to separate partition keys",
    "[": "'[', which Dagster uses in partition selections",
    "]": "']', which Dagster uses in partition selections",
}
# fsspec implementation module and how to install it, per object-store scheme.
_FILESYSTEM_MODULES = {
    "s3": ("s3fs", "pip install 'flux2-pipeline[s3]'"),
    "s3a": ("s3fs", "pip install 'flux2-pipeline[s3]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}


def partition_key_problem(key: str) -> str | None:
    """Why `key` can't be a partition key, or None when it can.

    >>> partition_key_problem("cats-2026")
    >>> partition_key_problem("a...b")
    "contains '...', which Dagster reserves for partition ranges"
    """
    if not key.strip():
        return "is blank"
    if len(key) > MAX_KEY_LENGTH:
        return f"is longer than {MAX_KEY_LENGTH} characters"
    for part, why in _FORBIDDEN_IN_KEYS.items():
        if part in key:
            return f"contains {why}"
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        return "contains a control character"
    return None


@dataclass(frozen=True)
class InputScan:
    """The input folder's partitions, and the files that cannot be one (name -> reason)."""

    found: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def skipped_lines(self) -> list[str]:
        """One line per skipped file, saying why and what to do."""
        return [
            f"skipped input file {name}: its name {why}; rename it to make it a partition"
            for name, why in self.skipped.items()
        ]


class Flux2Storage(ConfigurableResource):  # type: ignore[type-arg]
    """The input folder (one Parquet file per partition) and the output root."""

    input_dir: str = Field(
        default="data/prompts",
        validate_default=True,
        description="FLUX2_INPUT_DIR: folder of input Parquet tables, one per partition.",
    )
    output_dir: str = Field(
        default="data/output",
        validate_default=True,
        description="FLUX2_OUTPUT_DIR: root of every dataset written (a folder or s3://...).",
    )
    max_decode_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="FLUX2_MAX_DECODE_PIXELS: the decode ceiling and budget, in pixels. "
        "Images above it are stored and described from their header without any decode "
        "(no thumbnail); the decodes of one step process hold at most this many pixels "
        "at once (about 4 bytes each).",
    )

    @field_validator("input_dir")
    @classmethod
    def _local_folder(cls, value: str) -> str:
        value = value.strip() or "data/prompts"
        if "\x00" in value:
            raise ValueError("must be a directory path, got a value with a NUL byte")
        return str(Path(value).expanduser().absolute())

    @field_validator("output_dir")
    @classmethod
    def _folder_or_store(cls, value: str) -> str:
        value = value.strip() or "data/output"
        if "\x00" in value:
            raise ValueError("must be a directory path, got a value with a NUL byte")
        if not is_remote_uri(value):
            return str(Path(value).expanduser().absolute())
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if not parts.netloc:
            raise ValueError(f"must name a bucket, such as {scheme}://bucket/prefix")
        module, install = _FILESYSTEM_MODULES.get(scheme, ("", ""))
        if module:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(
                    f"points at an object store ({scheme}://), which needs {module} ({install})"
                ) from None
        return value.rstrip("/")

    @property
    def output_is_remote(self) -> bool:
        """True when the output root is an object store rather than a local folder."""
        return is_remote_uri(self.output_dir)

    def input_path(self, key: str) -> Path:
        """The input table of partition `key`."""
        return Path(self.input_dir) / f"{key}.parquet"

    def results_path(self, key: str) -> UPath:
        """The results dataset file of partition `key`."""
        return self.output_root() / "flux2_edits" / f"{key}.parquet"

    def output_root(self) -> UPath:
        """The root every dataset is written under (FLUX2_OUTPUT_DIR): a folder or a URI."""
        return as_path(self.output_dir)

    def images_dir(self) -> UPath:
        """The content-addressed image store: `<root>/images/<sha[:2]>/<sha>.<ext>`."""
        return self.output_root() / "images"

    def image_manifest_path(self, key: str) -> UPath:
        """The image manifest of partition `key` (one row per stored image)."""
        return self.output_root() / "flux2_images" / f"{key}.parquet"

    def contact_sheet_path(self, key: str) -> UPath:
        """The contact sheet PNG of partition `key`, next to its manifest."""
        return self.output_root() / "flux2_images" / f"{key}.contact.png"

    def training_dataset_dir(self) -> UPath:
        """The sharded training dataset folder (`datasets.load_dataset` data_dir)."""
        return self.output_root() / "flux2_training_dataset"

    def scan_inputs(self) -> InputScan:
        """Input files by partition key, and the files skipped with the reason."""
        folder = Path(self.input_dir)
        scan = InputScan()
        if not folder.is_dir():
            return scan
        for path in sorted(folder.glob("*.parquet")):
            if not path.is_file() or path.name.startswith("."):
                continue
            problem = partition_key_problem(path.stem)
            if problem:
                scan.skipped[path.name] = problem
            else:
                scan.found[path.stem] = path
        return scan
