"""The training dataset's columns: a pyarrow schema and the matching `datasets` Features.

Images use the Hugging Face encoding, a struct {bytes: binary, path: string}; the
`datasets` Features JSON travels in the Parquet schema metadata under b"huggingface"
(`{"info": {"features": ...}}`), which is how `datasets.load_dataset("parquet", ...)`
knows to decode `input_image`, `edited_image` and `source_images` into PIL images.

The first three columns are the ones diffusers' instruct-pix2pix trainer reads by default
(`input_image`, `edit_prompt`, `edited_image`), so it needs no column flags.

The edit parameters are not spelled out here: their columns come from
`flux2_pipeline.runcomfy.EditRequest` (names, Python types, defaults), the one place they
are declared, so a parameter added there reaches the dataset without an edit here.

The writer needs only pyarrow: the Features are written out here as JSON rather than built
with `datasets.Features`, because `datasets` (with huggingface-hub, dill, multiprocess,
xxhash) is a heavy dependency that producing the files does not need. It is a `dev`
dependency, and a test checks that `datasets.Features.from_dict(FEATURES).arrow_schema`
equals `DATASET_SCHEMA`, so the two cannot drift apart.

Example::

    import datasets
    ds = datasets.load_dataset("parquet", data_dir="data/output/flux2_training_dataset",
                               split="train")
    ds[0]["edited_image"]          # <PIL.PngImagePlugin.PngImageFile ...>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import pyarrow as pa

from flux2_pipeline.runcomfy import PARAMETER_DEFAULTS, PARAMETER_NAMES, EditRequest

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""Hugging Face `datasets.Image()` storage: encoded bytes plus an informative file name."""

TRAINER_COLUMNS = ("input_image", "edit_prompt", "edited_image")
"""The columns diffusers' `train_instruct_pix2pix.py` reads by default, in its order."""


@dataclass(frozen=True, slots=True)
class Column:
    """One dataset column: its Arrow type, its `datasets` feature and what it holds."""

    name: str
    arrow: pa.DataType
    feature: dict[str, Any]
    description: str


def _value(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "_type": "Value"}


_IMAGE: dict[str, Any] = {"_type": "Image"}

# Python type of an `EditRequest` field -> (Arrow type, `datasets` dtype). bool before int:
# bool is a subclass of int.
_SCALARS: list[tuple[type, pa.DataType, str]] = [
    (bool, pa.bool_(), "bool"),
    (int, pa.int64(), "int64"),
    (float, pa.float64(), "float64"),
    (str, pa.string(), "string"),
]


def value_label(value: Any) -> str:
    """A parameter value as the card, the state file and descriptions show it.

    Strings as they are, anything else as JSON::

        >>> value_label(2.5), value_label(False), value_label("square_hd")
        ('2.5', 'false', 'square_hd')
    """
    return value if isinstance(value, str) else json.dumps(value)


def parameter_column(name: str) -> Column:
    """The column of one edit parameter, typed after its `EditRequest` field.

    A `Literal[...]` of strings (`image_size`, `output_format`) is a string column whose
    description lists the allowed values; a type with no column type raises `TypeError`.

    Example::

        >>> parameter_column("seed").arrow
        DataType(int64)
    """
    annotation = EditRequest.model_fields[name].annotation
    described = f"effective {name} (API default {value_label(PARAMETER_DEFAULTS[name])}"
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        if all(isinstance(choice, str) for choice in choices):
            allowed = ", ".join(choices)
            return Column(name, pa.string(), _value("string"), f"{described}; one of {allowed})")
    for python_type, arrow, dtype in _SCALARS:
        if annotation is python_type:
            return Column(name, arrow, _value(dtype), described + ")")
    raise TypeError(f"EditRequest.{name}: no dataset column type for {annotation!r}")


_COLUMNS: list[Column] = [
    Column("input_image", IMAGE_TYPE, _IMAGE, "the first reference image (the trainer's input)"),
    Column("edit_prompt", pa.string(), _value("string"), "the edit instruction as sent"),
    Column("edited_image", IMAGE_TYPE, _IMAGE, "one output image of the job"),
    Column("prompt", pa.string(), _value("string"), "the edit instruction as sent"),
    Column(
        "source_images",
        pa.list_(IMAGE_TYPE),
        {"feature": _IMAGE, "_type": "List"},
        "every reference image sent, in order",
    ),
    Column("num_source_images", pa.int64(), _value("int64"), "reference images sent (1 to 3)"),
    *(parameter_column(name) for name in PARAMETER_NAMES),
    Column("partition", pa.string(), _value("string"), "the prompt table (partition key)"),
    Column("row_id", pa.string(), _value("string"), "the row in flux2_edits/<partition>.parquet"),
    Column("request_id", pa.string(), _value("string"), "the API job that made the image"),
    Column("image_index", pa.int64(), _value("int64"), "position of the image in output_urls"),
    Column("edited_sha256", pa.string(), _value("string"), "sha256 of the edited image's bytes"),
    Column(
        "source_sha256s",
        pa.list_(pa.string()),
        {"feature": _value("string"), "_type": "List"},
        "sha256 of each reference image",
    ),
    Column("width", pa.int64(), _value("int64"), "edited image width in pixels"),
    Column("height", pa.int64(), _value("int64"), "edited image height in pixels"),
]

COLUMNS: tuple[Column, ...] = tuple(_COLUMNS)
"""Every column of the dataset, in order."""

FEATURES: dict[str, Any] = {column.name: column.feature for column in COLUMNS}
"""The `datasets.Features` of the dataset, as `Features.to_dict()` writes them."""

COLUMN_DESCRIPTIONS: dict[str, str] = {column.name: column.description for column in COLUMNS}

DATASET_SCHEMA = pa.schema(
    [pa.field(column.name, column.arrow) for column in COLUMNS],
    metadata={b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode()},
)
"""The shards' Arrow schema, carrying the Features JSON in its metadata."""
