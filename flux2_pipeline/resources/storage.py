"""`Flux2Storage`: where input tables are read and datasets are written.

Example::

    storage = Flux2Storage(input_dir="data/prompts", output_dir="data/output")
    storage.input_path("cats")      # data/prompts/cats.parquet
    storage.results_path("cats")    # data/output/flux2_edits/cats.parquet
    storage.image_manifest_path("cats")  # data/output/flux2_images/cats.parquet

`input_dir` and `output_dir` may be object-store URIs (`s3://bucket/prefix`, the `s3` extra,
credentials from the usual AWS_* variables; `input_dir` any fsspec URL): the paths are
`UPath`s (see `flux2_pipeline.paths`), local folders absolute paths. A URL never carries
credentials (no `user:password@`, no query string such as a signature), so it can be shown
in logs and metadata. A file whose stem cannot be a Dagster partition key is not a
partition; `scan_inputs` says why (see `partition_key_problem`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import fsspec
from dagster import ConfigurableResource
from pydantic import Field, field_validator
from upath import UPath

from flux2_pipeline.media import DEFAULT_MAX_PIXELS
from flux2_pipeline.paths import (
    as_path,
    is_fsspec_uri,
    is_local,
    is_remote_uri,
    list_files,
    local_path,
)
from flux2_pipeline.resources.catalogue import setting

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
    """The input folder's partitions, and the files that cannot be one (name -> reason).

    `signatures` holds, per partition key, what changes whenever the file's content may
    have (size and mtime, or an object's version or ETag): a file whose signature is
    unchanged need not be read again. None when the store reports nothing of the kind.
    """

    found: dict[str, UPath] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    signatures: dict[str, str | None] = field(default_factory=dict)

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
        description="The input Parquet tables, one partition per file `<key>.parquet`: a "
        "folder, or an object-store URL such as s3://bucket/prefix (any fsspec URL).",
        json_schema_extra=setting("FLUX2_INPUT_DIR"),
    )
    output_dir: str = Field(
        default="data/output",
        validate_default=True,
        description="Root of every dataset written: a folder, or an object-store URL such "
        "as s3://bucket/prefix.",
        json_schema_extra=setting("FLUX2_OUTPUT_DIR"),
    )
    max_decode_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="The decode ceiling and budget, in pixels: images above it are stored "
        "and described from their header without any decode (no thumbnail); the decodes of "
        "one step process hold at most this many pixels at once (about 4 bytes each).",
        json_schema_extra=setting("FLUX2_MAX_DECODE_PIXELS"),
    )

    @field_validator("input_dir")
    @classmethod
    def _folder_or_url(cls, value: str) -> str:
        value = value.strip() or "data/prompts"
        if "\x00" in value:
            raise ValueError("must be a directory path, got a value with a NUL byte")
        if not (is_remote_uri(value) or is_fsspec_uri(value)):
            return str(Path(value).expanduser().absolute())
        return _store_url(value)

    @field_validator("output_dir")
    @classmethod
    def _folder_or_store(cls, value: str) -> str:
        value = value.strip() or "data/output"
        if "\x00" in value:
            raise ValueError("must be a directory path, got a value with a NUL byte")
        if not is_remote_uri(value):
            return str(Path(value).expanduser().absolute())
        parts = urlsplit(value)
        _require_bucket(parts)
        _require_store_module(parts.scheme.lower())
        return value.rstrip("/")

    @property
    def input_is_remote(self) -> bool:
        """True when the input tables are in an object store rather than a local folder."""
        return not is_local(self.input_root())

    def input_root(self) -> UPath:
        """The folder or object-store prefix of the input tables (FLUX2_INPUT_DIR)."""
        return as_path(self.input_dir)

    def input_dir_problem(self) -> str | None:
        """Why the input tables cannot be listed, or None when they can (an empty prefix
        of an object store is an empty folder)."""
        root = self.input_root()
        if is_local(root):
            return None if local_path(root).is_dir() else f"{self.input_dir} is not a folder"
        bucket = urlsplit(self.input_dir).netloc
        try:
            if list_files(root, ".parquet") or root.protocol == "memory" or root.fs.exists(bucket):
                return None
        except Exception as exc:  # the store's own errors: credentials, network, access
            return f"{self.input_dir} cannot be listed ({type(exc).__name__})"
        return f"{self.input_dir} names no existing bucket or container ({bucket})"

    @property
    def output_is_remote(self) -> bool:
        """True when the output root is an object store rather than a local folder."""
        return is_remote_uri(self.output_dir)

    def input_path(self, key: str) -> UPath:
        """The input table of partition `key` (a `pathlib.Path` too when it is local)."""
        return self.input_root() / f"{key}.parquet"

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
        """Input files by partition key, and the files skipped with the reason.

        One listing of the folder or prefix; nothing is read.
        """
        scan = InputScan()
        for listed in list_files(self.input_root(), ".parquet"):
            path = listed.path
            problem = partition_key_problem(path.stem)
            if problem:
                scan.skipped[path.name] = problem
            else:
                scan.found[path.stem] = path
                scan.signatures[path.stem] = listed.signature
        return scan


def _require_bucket(parts: SplitResult) -> None:
    if not parts.netloc:
        scheme = parts.scheme.lower()
        raise ValueError(f"must name a bucket, such as {scheme}://bucket/prefix")


def _require_store_module(scheme: str) -> bool:
    """Check that the known object store's client library imports; False for other schemes."""
    module, install = _FILESYSTEM_MODULES.get(scheme, ("", ""))
    if not module:
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"points at an object store ({scheme}://), which needs {module} ({install})"
        ) from None
    return True


def _store_url(value: str) -> str:
    """An object-store URL checked: it names a bucket, carries no credentials, and its
    filesystem can be loaded. Error messages never repeat the URL (it may hold a secret)."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if parts.username or parts.password or parts.query:
        raise ValueError(
            f"must be a {scheme}:// URL without credentials or a query string (such as a "
            "signature); give the store's credentials in its own variables (AWS_* for s3://)"
        )
    if scheme != "memory":
        _require_bucket(parts)
    if not _require_store_module(scheme):
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError):
            raise ValueError(
                f"points at {scheme}://, whose fsspec filesystem cannot be loaded here"
            ) from None
    return value.rstrip("/")
