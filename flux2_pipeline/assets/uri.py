"""`dagster/uri`: where a materialization's data lives, as Dagster's catalog shows it.

A local file is a `file://` URI; an object-store path keeps its own (`s3://bucket/key`).

Example::

    >>> storage_uri("/data/output/flux2_edits/cats.parquet")
    'file:///data/output/flux2_edits/cats.parquet'
    >>> storage_uri("s3://bucket/out/flux2_edits/cats.parquet")
    's3://bucket/out/flux2_edits/cats.parquet'
"""

import os
from pathlib import Path

from upath import UPath

from flux2_pipeline.paths import is_remote_uri

URI = "dagster/uri"
"""Dagster's metadata key for the storage location of an asset's data."""


def storage_uri(path: str | os.PathLike[str] | UPath) -> str:
    """The URI of a local path or an object-store path."""
    text = str(path)
    if is_remote_uri(text):
        return text
    return Path(text).expanduser().absolute().as_uri()
