"""The training dataset as a trainer sees it: built by the real assets from the emulator.

`_preprocess_train` does what diffusers' `examples/instruct_pix2pix/train_instruct_pix2pix.py`
does to a batch (its `convert_to_np`, `preprocess_images` and `preprocess_train`), with numpy
in place of torch/torchvision: `.convert("RGB").resize((r, r))` on both images, one stack,
scaled to [-1, 1], then the same crop and horizontal flip for the input and the edited image.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from dagster import AssetKey, DagsterInstance
from PIL import Image

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.dataset import CARD_FILE
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table

datasets = pytest.importorskip("datasets")

RESOLUTION = 64
# The script's argparse defaults for the three column flags.
ORIGINAL_IMAGE_COLUMN, EDIT_PROMPT_COLUMN, EDITED_IMAGE_COLUMN = (
    "input_image",
    "edit_prompt",
    "edited_image",
)


def _convert_to_np(image: Image.Image, resolution: int) -> np.ndarray[Any, Any]:
    image = image.convert("RGB").resize((resolution, resolution))
    return np.array(image).transpose(2, 0, 1)


def _center_crop(images: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def _preprocess_train(examples: dict[str, list[Any]], flip: bool) -> dict[str, list[Any]]:
    originals = np.concatenate(
        [_convert_to_np(image, RESOLUTION) for image in examples[ORIGINAL_IMAGE_COLUMN]]
    )
    edited = np.concatenate(
        [_convert_to_np(image, RESOLUTION) for image in examples[EDITED_IMAGE_COLUMN]]
    )
    # One array for both, so the same crop and flip apply to the input and the edit.
    images = np.concatenate([originals, edited]).astype(np.float32)
    images = 2 * (images / 255) - 1
    images = _center_crop(images, RESOLUTION)
    if flip:
        images = images[..., ::-1]
    original_values, edited_values = np.split(images, 2)
    examples["original_pixel_values"] = list(original_values.reshape(-1, 3, RESOLUTION, RESOLUTION))
    examples["edited_pixel_values"] = list(edited_values.reshape(-1, 3, RESOLUTION, RESOLUTION))
    examples["captions"] = list(examples[EDIT_PROMPT_COLUMN])
    return examples


def _inputs(settings: Settings, base: str) -> None:
    write_table(
        Path(settings.storage.input_dir),
        "single",
        prompt_rows(base, "single", 3, image_size="square"),
    )
    write_table(
        Path(settings.storage.input_dir),
        "multi",
        [
            {
                "id": f"multi-{i}",
                "prompt": f"combine picture {i} with its neighbour",
                "image_urls": [f"{base}/samples/first-{i}.png", f"{base}/samples/second-{i}.png"],
                "image_size": "landscape_4_3",
                "num_images": 2,
            }
            for i in range(2)
        ],
    )


def _metadata(instance: DagsterInstance) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(AssetKey("flux2_training_dataset"))
    assert event is not None and event.asset_materialization is not None
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def test_the_trainers_preprocessing_runs_on_the_dataset_as_written(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance, tmp_path: Path
) -> None:
    _inputs(settings, emulator.base_url)
    report = run_backfill(settings, instance=instance, log_level="WARNING")
    assert report.succeeded, report
    assert report.dataset is not None and report.dataset.rows == 3 + 2 * 2
    folder = settings.storage.output_root() / "flux2_training_dataset"

    # What `--dataset_name <folder>` does: load_dataset(<folder>), through the card's configs.
    dataset = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))
    column_names = dataset["train"].column_names
    for column in (ORIGINAL_IMAGE_COLUMN, EDIT_PROMPT_COLUMN, EDITED_IMAGE_COLUMN):
        assert column in column_names
    assert column_names[:3] == [ORIGINAL_IMAGE_COLUMN, EDIT_PROMPT_COLUMN, EDITED_IMAGE_COLUMN]
    train = dataset["train"].select_columns(
        [ORIGINAL_IMAGE_COLUMN, EDIT_PROMPT_COLUMN, EDITED_IMAGE_COLUMN]
    )
    plain = train.with_transform(lambda batch: _preprocess_train(batch, flip=False))
    flipped = train.with_transform(lambda batch: _preprocess_train(batch, flip=True))
    batch = plain[:]
    assert len(batch["original_pixel_values"]) == len(train) == 7
    for index, example in enumerate(train):
        original = plain[index]["original_pixel_values"]
        edited = plain[index]["edited_pixel_values"]
        for values in (original, edited):
            assert values.shape == (3, RESOLUTION, RESOLUTION) and values.dtype == np.float32
            assert values.min() >= -1 and values.max() <= 1 and values.std() > 0
        expected = 2 * (_convert_to_np(example["input_image"], RESOLUTION) / 255) - 1
        np.testing.assert_allclose(original, expected, rtol=0, atol=1e-6)
        both_flipped = flipped[index]
        np.testing.assert_array_equal(both_flipped["original_pixel_values"], original[..., ::-1])
        np.testing.assert_array_equal(both_flipped["edited_pixel_values"], edited[..., ::-1])
        assert plain[index]["captions"] == example[EDIT_PROMPT_COLUMN]
        assert example[EDITED_IMAGE_COLUMN].mode in ("RGB", "RGBA", "L", "P")

    # Rows made from two references can be filtered out (or kept) by num_source_images.
    full = dataset["train"]
    assert sorted(full["num_source_images"]) == [1, 1, 1, 2, 2, 2, 2]
    single = full.filter(lambda n: n == 1, input_columns="num_source_images")
    assert set(single["partition"]) == {"single"}


def test_every_input_image_is_the_stored_first_reference_file(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance, tmp_path: Path
) -> None:
    _inputs(settings, emulator.base_url)
    assert run_backfill(settings, instance=instance, log_level="WARNING").succeeded
    out = settings.storage.output_root()
    stored_first: dict[tuple[str, str], bytes] = {}
    for key in ("single", "multi"):
        for record in pq.read_table(out / "flux2_images" / f"{key}.parquet").to_pylist():
            if record["role"] == "source" and record["index"] == 0:
                stored_first[(key, record["row_id"])] = (out / record["path"]).read_bytes()
    results = {
        (key, row["row_id"]): row
        for key in ("single", "multi")
        for row in pq.read_table(out / "flux2_edits" / f"{key}.parquet").to_pylist()
    }

    ds = datasets.load_dataset(
        "parquet",
        data_dir=str(out / "flux2_training_dataset"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    raw = ds.cast_column("input_image", datasets.Image(decode=False)).cast_column(
        "source_images", datasets.List(datasets.Image(decode=False))
    )
    assert len(raw) == 7
    for row in raw:
        key = (row["partition"], row["row_id"])
        source = results[key]
        assert row["input_image"]["bytes"] == stored_first[key]
        assert row["input_image"]["bytes"] == row["source_images"][0]["bytes"]
        assert hashlib.sha256(stored_first[key]).hexdigest() == row["source_sha256s"][0]
        assert row["num_source_images"] == len(source["image_urls"]) == len(row["source_images"])
        assert row["edit_prompt"] == row["prompt"] == source["prompt"]
        assert row["request_id"] == source["request_id"]
    decoded = ds[0]["input_image"]
    assert isinstance(decoded, Image.Image) and decoded.size == (512, 512)

    # The card describes what was written, and the metadata points at it.
    metadata = _metadata(instance)
    assert metadata["flux2/card"] == str(out / "flux2_training_dataset" / CARD_FILE)
    text = (out / "flux2_training_dataset" / CARD_FILE).read_text()
    header = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert header["dataset_info"]["splits"][0]["num_examples"] == 7
    assert "| `multi` | 4 | 1 | 0 |" in text and "| `single` | 3 | 1 | 0 |" in text
    assert "| `image_size` | `landscape_4_3` (4), `square` (3) |" in text
    assert metadata["flux2/value_counts"]["num_source_images"] == {"1": 3, "2": 4}


def _python_block(markdown: str) -> str:
    match = re.search(r"```python\n(.*?)```", markdown, re.DOTALL)
    assert match is not None, markdown
    return match.group(1)


def test_the_load_snippet_alone_loads_the_dataset_from_an_s3_output(
    settings: Settings,
    s3_bucket: str,
    s3_endpoint: str,
    emulator: EmulatorServer,
    instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("FLUX2_OUTPUT_DIR", f"s3://{s3_bucket}/out")
    monkeypatch.setenv("FLUX2_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    s3_settings = Settings.from_env()
    write_table(
        Path(s3_settings.storage.input_dir), "remote", prompt_rows(emulator.base_url, "remote", 2)
    )
    assert run_backfill(s3_settings, instance=instance, log_level="WARNING").succeeded
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))

    snippet = _python_block(_metadata(instance)["flux2/load"])
    assert f'"endpoint_url": "{s3_endpoint}"' in snippet
    assert "testing" not in snippet  # the credentials' value in the fixture
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    ds = namespace["ds"]
    assert len(ds) == 2 and ds[0]["input_image"].size == (512, 512)
    assert [row["row_id"] for row in ds] == ["remote-0", "remote-1"]

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = f"{s3_bucket}/out"
    card = fs.cat_file(f"{root}/flux2_training_dataset/{CARD_FILE}").decode()
    assert "testing" not in card
    load_block, copy_block = re.findall(r"```python\n(.*?)```", card, re.DOTALL)[:2]
    assert snippet.startswith(load_block)
    raw = ds.cast_column("input_image", datasets.Image(decode=False))
    for row in raw:
        manifest = pq.read_table(
            io.BytesIO(fs.cat_file(f"{root}/flux2_images/{row['partition']}.parquet"))
        ).to_pylist()
        (first,) = [
            r
            for r in manifest
            if (r["row_id"], r["role"], r["index"]) == (row["row_id"], "source", 0)
        ]
        assert row["input_image"]["bytes"] == fs.cat_file(f"{root}/{first['path']}")

    # The card's copy step gives a local folder the trainer's `--dataset_name` loads.
    monkeypatch.chdir(tmp_path)
    exec(copy_block, {})
    local = datasets.load_dataset("flux2_training_dataset", split="train")
    assert [row["row_id"] for row in local] == ["remote-0", "remote-1"]
