"""The dataset card: `README.md` at the dataset's root, rewritten with the shards.

It opens with the YAML header the Hugging Face Hub and `datasets` read (`dataset_info` with
the features and the train split, `configs` with its data files), so
`datasets.load_dataset("<folder>")` (what diffusers' trainers do with `--dataset_name`)
loads the shards with the right features. The body says what a person fine-tuning a model
needs: rows by partition, the parameters used, the model, how a row traces back to its
request and input file, and the exact commands to load the data and to train on it.

For an object store the load snippet carries `storage_options` with the endpoint from
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (never credentials: those stay in the usual
AWS variables or files).

Example::

    text = render_card(report, input_dir="data/prompts")
    load_snippet(UPath("s3://bucket/out/flux2_training_dataset"))
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from upath import UPath

from flux2_pipeline.dataset.features import COLUMNS, FEATURES, TRAINER_COLUMNS
from flux2_pipeline.dataset.report import SPLIT_DIR, BuildReport
from flux2_pipeline.paths import is_local
from flux2_pipeline.runcomfy import MODEL_PATH

TRAIN_SCRIPT = "examples/instruct_pix2pix/train_instruct_pix2pix.py"
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def yaml_features(features: Mapping[str, Any] = FEATURES) -> list[dict[str, Any]]:
    """The Features as the card's YAML lists them (`datasets`' `Features._to_yaml_list`).

    >>> yaml_features({"a": {"_type": "Image"}, "b": {"feature": {"_type": "Image"},
    ...                                               "_type": "List"}})
    [{'name': 'a', 'dtype': 'image'}, {'name': 'b', 'list': 'image'}]
    """
    return [{"name": name, **_yaml_type(feature, name)} for name, feature in features.items()]


def _yaml_type(feature: Mapping[str, Any], name: str) -> dict[str, Any]:
    kind = feature.get("_type")
    if kind == "Value":
        return {"dtype": feature["dtype"]}
    if kind == "Image":
        return {"dtype": "image"}
    if kind == "List":
        inner = _yaml_type(feature["feature"], name)
        return {"list": inner["dtype"]} if set(inner) == {"dtype"} else {"list": [inner]}
    raise ValueError(f"column {name}: no card YAML for feature type {kind!r}")


def storage_options(out_dir: UPath) -> dict[str, Any] | None:
    """What `datasets` needs besides the path to read `out_dir`; None for a local folder.

    Only the endpoint (from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, without any user
    info or query) goes in; credentials never do.

    >>> storage_options(UPath("/data/ds")) is None
    True
    """
    if is_local(out_dir):
        return None
    for variable in _ENDPOINT_VARIABLES:
        endpoint = os.environ.get(variable, "").strip()
        if endpoint:
            return {"client_kwargs": {"endpoint_url": _without_secrets(endpoint)}}
    return {}


def _without_secrets(url: str) -> str:
    """`url` without user info, query or fragment (an endpoint never needs them)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def load_snippet(out_dir: UPath) -> str:
    """Python that loads the dataset at `out_dir` with `datasets` and nothing else.

    >>> print(load_snippet(UPath("/data/ds")))
    import datasets
    ds = datasets.load_dataset("parquet", data_dir="/data/ds", split="train")
    """
    options = storage_options(out_dir)
    lines = ["import datasets"]
    if options is None:
        path = json.dumps(str(out_dir))
        lines.append(f'ds = datasets.load_dataset("parquet", data_dir={path}, split="train")')
        return "\n".join(lines)
    # `datasets` reads `data_dir` as a local folder, so a bucket is named by its files.
    shards = f"{str(out_dir).rstrip('/')}/{SPLIT_DIR}/*.parquet"
    lines += [
        "# credentials come from the usual AWS variables or files, never from here",
        f"storage_options = {json.dumps(options)}",
        "ds = datasets.load_dataset(",
        '    "parquet",',
        f'    data_files={{"train": {json.dumps(shards)}}},',
        '    split="train",',
        "    storage_options=storage_options,",
        ")",
    ]
    return "\n".join(lines)


def copy_snippet(out_dir: UPath, local: str = "flux2_training_dataset") -> str:
    """Python that copies a dataset in an object store to a local folder (for trainers)."""
    options = storage_options(out_dir) or {}
    return "\n".join(
        [
            "import fsspec",
            f"fs = fsspec.filesystem({json.dumps(out_dir.protocol)}, **{json.dumps(options)})",
            f"fs.get({json.dumps(out_dir.path.rstrip('/') + '/')}, {json.dumps(local + '/')},"
            " recursive=True)",
        ]
    )


def _header(report: BuildReport) -> dict[str, Any]:
    shard_files = [f"{SPLIT_DIR}/{name}" for build in report.partitions for name in build.shards]
    return {
        "pretty_name": "FLUX.2 [dev] image edits",
        "task_categories": ["image-to-image"],
        "tags": ["image-editing", "instruct-pix2pix", "flux2", "synthetic"],
        "size_categories": [_size_category(report.rows)],
        "dataset_info": {
            "features": yaml_features(),
            "splits": [
                {"name": "train", "num_bytes": report.arrow_bytes, "num_examples": report.rows}
            ],
            "download_size": report.bytes,
            "dataset_size": report.arrow_bytes,
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": shard_files}],
                "default": True,
            }
        ],
    }


def _size_category(rows: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < bound:
            return label
    return "100K<n<1M" if rows < 1_000_000 else "1M<n<10M"


def _partition_table(report: BuildReport, input_dir: str | None) -> list[str]:
    where = f"`{input_dir}/<partition>.parquet`" if input_dir else "`<partition>.parquet`"
    lines = [
        f"Each partition is one input file ({where}, the file's stem is the key).",
        "",
        "| partition | rows | shards | edited images left out |",
        "| --- | ---: | ---: | ---: |",
    ]
    for build in report.partitions:
        key = build.key.replace("|", "\\|")
        lines.append(f"| `{key}` | {build.rows} | {len(build.shards)} | {build.skipped} |")
    lines.append(f"| **all** | **{report.rows}** | **{report.shards}** | **{report.skipped}** |")
    return lines


def _parameter_lines(report: BuildReport) -> list[str]:
    lines = ["| column | values (rows) |", "| --- | --- |"]
    for name, counts in report.value_counts.items():
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"`{label}` ({count})" for label, count in ordered[:12])
        if len(ordered) > 12:
            shown += f", and {len(ordered) - 12} more values"
        lines.append(f"| `{name}` | {shown} |")
    return lines


def _train_command(local_dir: str) -> str:
    original, prompt, edited = TRAINER_COLUMNS
    return "\n".join(
        [
            'export MODEL_NAME="stable-diffusion-v1-5/stable-diffusion-v1-5"',
            f"accelerate launch {TRAIN_SCRIPT} \\",
            '  --pretrained_model_name_or_path="$MODEL_NAME" \\',
            f"  --dataset_name={shlex.quote(local_dir)} \\",
            f"  --original_image_column={original} --edit_prompt_column={prompt} \\",
            f"  --edited_image_column={edited} \\",
            "  --resolution=256 --random_flip \\",
            "  --train_batch_size=4 --gradient_accumulation_steps=4 --gradient_checkpointing \\",
            "  --max_train_steps=15000 --learning_rate=5e-05 --lr_warmup_steps=0 \\",
            "  --conditioning_dropout_prob=0.05 --mixed_precision=fp16 --seed=42 \\",
            "  --output_dir=instruct-pix2pix-flux2",
        ]
    )


def _webdataset_lines(report: BuildReport) -> list[str]:
    export = report.webdataset
    if export is None:
        return []
    lines = [
        "## WebDataset shards",
        "",
        f"The same rows, one tar per Parquet shard ({len(export.tars)} tars), are in "
        f"`{export.out_dir}`: per sample `input_image.<ext>`, `edited_image.<ext>`, "
        "`source_<i>.<ext>`, `edit_prompt.txt` and `json` (every other column).",
        "",
    ]
    if is_local(export.out_dir):
        tars = json.dumps(f"{export.out_dir}/*.tar")
        lines += [
            "```python",
            "import glob",
            "import webdataset as wds",
            f'ds = wds.WebDataset(sorted(glob.glob({tars})), shardshuffle=False).decode("pil")',
            "```",
            "",
        ]
    return lines


def render_card(report: BuildReport, *, input_dir: str | None = None) -> str:
    """The whole `README.md` for the dataset `report` describes (deterministic text)."""
    out_dir = report.out_dir
    local = is_local(out_dir)
    local_dir = str(out_dir) if local else "flux2_training_dataset"
    header = yaml.safe_dump(_header(report), sort_keys=False, allow_unicode=True, width=100)
    columns = [f"| `{c.name}` | {c.description} |" for c in COLUMNS]
    body = [
        "---",
        header.rstrip("\n"),
        "---",
        "",
        "# FLUX.2 [dev] image edits",
        "",
        f"{report.rows} image-edit examples: each row is one output image of a FLUX.2 [dev] edit "
        f"job run through RunComfy's queue API (`{MODEL_PATH}`), beside the reference image(s) "
        "and the instruction that produced it. Written by flux2-pipeline; this card is "
        "rewritten whenever the shards are.",
        "",
        "## Rows by partition",
        "",
        *_partition_table(report, input_dir),
        "",
        "Edited images whose file or whose row's reference images were not stored are left "
        "out (counted above).",
        "",
        "## Parameters used",
        "",
        "The effective parameters of each job (the row's own values, else the configured "
        "defaults, else the API's):",
        "",
        *_parameter_lines(report),
        "",
        "## Columns",
        "",
        f"`{'`, `'.join(TRAINER_COLUMNS)}` are what diffusers' instruct-pix2pix trainer reads "
        "by default. `input_image` is the first reference, byte for byte; rows made from "
        "several references have `num_source_images` > 1 and all of them in `source_images` "
        "(filter with `ds.filter(lambda n: n == 1, input_columns='num_source_images')`).",
        "",
        "| column | meaning |",
        "| --- | --- |",
        *columns,
        "",
        "## Where each row comes from",
        "",
        "`partition` is the input file's stem, `row_id` the row of that input file (its `id`, "
        "or one derived from the row's content), `request_id` the RunComfy job that made the "
        "image. The same `row_id` keys the row in `flux2_edits/<partition>.parquet` (the "
        "request as sent, status, timings, cost) and `flux2_images/<partition>.parquet` (each "
        "image's URL and stored file), both next to this folder. `edited_sha256` and "
        "`source_sha256s` name the stored files `images/<sha[:2]>/<sha>.<ext>`.",
        "",
        "## Load",
        "",
        "```python",
        load_snippet(out_dir),
        "```",
        "",
    ]
    if not local:
        body += [
            "Trainers read a local folder; copy it first:",
            "",
            "```python",
            copy_snippet(out_dir, local_dir),
            "```",
            "",
        ]
    body += _webdataset_lines(report)
    body += [
        "## Train",
        "",
        f"With [diffusers](https://github.com/huggingface/diffusers)' `{TRAIN_SCRIPT}`, "
        "pass the folder as `--dataset_name` (the script's `--train_data_dir` reads images "
        "with the `imagefolder` loader, not Parquet). The three column flags are the script's "
        "defaults, written out; the other settings are those of the script's README example:",
        "",
        "```bash",
        _train_command(local_dir),
        "```",
        "",
    ]
    return "\n".join(body)
