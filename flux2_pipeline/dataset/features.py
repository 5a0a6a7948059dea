"""The training dataset's columns: a pyarrow schema and the matching `datasets` Features.

Images use the Hugging Face encoding, a struct {bytes: binary, path: string}; the
`datasets` Features JSON travels in the Parquet schema metadata under b"huggingface"
(`{"info": {"features": ...}}`), which is how `datasets.load_dataset("parquet", ...)`
knows to decode `edited_image` and `source_images` into PIL images.

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
from typing import Any

import pyarrow as pa

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""Hugging Face `datasets.Image()` storage: encoded bytes plus an informative file name."""


def _value(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "_type": "Value"}


_IMAGE: dict[str, Any] = {"_type": "Image"}

_COLUMNS: list[tuple[str, pa.DataType, dict[str, Any], str]] = [
    ("prompt", pa.string(), _value("string"), "the edit instruction as sent"),
    (
        "source_images",
        pa.list_(IMAGE_TYPE),
        {"feature": _IMAGE, "_type": "List"},
        "the reference images sent, in order",
    ),
    ("edited_image", IMAGE_TYPE, _IMAGE, "one output image of the job"),
    ("guidance_scale", pa.float64(), _value("float64"), "effective guidance scale"),
    ("seed", pa.int64(), _value("int64"), "effective seed"),
    ("num_inference_steps", pa.int64(), _value("int64"), "effective inference steps"),
    ("image_size", pa.string(), _value("string"), "effective image size preset"),
    ("num_images", pa.int64(), _value("int64"), "images the job produced"),
    ("enable_prompt_expansion", pa.bool_(), _value("bool"), "effective prompt expansion"),
    ("output_format", pa.string(), _value("string"), "effective output format"),
    ("partition", pa.string(), _value("string"), "the prompt table (partition key)"),
    ("row_id", pa.string(), _value("string"), "the row in flux2_edits/<partition>.parquet"),
    ("request_id", pa.string(), _value("string"), "the API job that made the image"),
    ("image_index", pa.int64(), _value("int64"), "position of the image in output_urls"),
    ("edited_sha256", pa.string(), _value("string"), "sha256 of the edited image's bytes"),
    (
        "source_sha256s",
        pa.list_(pa.string()),
        {"feature": _value("string"), "_type": "List"},
        "sha256 of each reference image",
    ),
    ("width", pa.int64(), _value("int64"), "edited image width in pixels"),
    ("height", pa.int64(), _value("int64"), "edited image height in pixels"),
]

FEATURES: dict[str, Any] = {name: feature for name, _, feature, _ in _COLUMNS}
"""The `datasets.Features` of the dataset, as `Features.to_dict()` writes them."""

COLUMN_DESCRIPTIONS: dict[str, str] = {name: text for name, _, _, text in _COLUMNS}

DATASET_SCHEMA = pa.schema(
    [pa.field(name, dtype) for name, dtype, _, _ in _COLUMNS],
    metadata={b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode()},
)
"""The shards' Arrow schema, carrying the Features JSON in its metadata."""
