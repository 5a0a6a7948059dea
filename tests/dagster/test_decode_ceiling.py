"""Above the decode ceiling an image is stored undecoded, and its manifest row says why.

In process, on the emulator's 512x512 samples with a 0.1 MP ceiling set as run config
(`ops.flux2_images.config.max_pixels`, which overrides FLUX2_MAX_DECODE_PIXELS): every
image is stored with its real size, the step succeeds, the metadata counts them, and the
contact sheet shows "not decoded" cells instead of thumbnails.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
from dagster import AssetKey, DagsterInstance
from PIL import Image

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.emulator import EmulatorServer
from flux2_pipeline.media.contact import PAD, TEXT_WIDTH, THUMB
from flux2_pipeline.settings import Settings
from tests.helpers.emulator import prompt_rows
from tests.helpers.tables import write_table


def test_a_low_decode_ceiling_stores_images_undecoded_and_says_why(
    settings: Settings, emulator: EmulatorServer, instance: DagsterInstance
) -> None:
    write_table(Path(settings.storage.input_dir), "ceil", prompt_rows(emulator.base_url, "ceil", 2))
    instance.add_dynamic_partitions(Flux2Keys().partitions_name, ["ceil"])
    result = (
        settings.definitions()
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(
            instance=instance,
            partition_key="ceil",
            asset_selection=[AssetKey("flux2_edits"), AssetKey("flux2_images")],
            run_config={"ops": {"flux2_images": {"config": {"max_pixels": 100_000}}}},
            raise_on_error=False,
        )
    )
    assert result.success
    output = settings.storage.output_root()
    rows = pq.read_table(output / "flux2_images" / "ceil.parquet").to_pylist()
    sources = [r for r in rows if r["role"] == "source"]
    assert [(r["status"], r["width"], r["height"], r["verified"]) for r in sources] == [
        ("ok", 512, 512, "header")
    ] * 2
    assert sources[0]["note"] == (
        "not decoded: 512x512 (0.3 MP) is above the 0.1 MP decode ceiling; "
        "stored and described from its header, no thumbnail"
    )
    event = instance.get_latest_materialization_event(AssetKey("flux2_images"))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert metadata["flux2/images_not_decoded"].value == len(rows)
    sheet = Image.open(io.BytesIO((output / "flux2_images" / "ceil.contact.png").read_bytes()))
    cell = sheet.getpixel((PAD + TEXT_WIDTH + THUMB - 4, 14 + 2 * PAD + THUMB - 4))
    assert cell == (110, 110, 120)  # the "not decoded" cell
