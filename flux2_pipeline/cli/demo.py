"""`flux2-pipeline demo`: the whole pipeline on sample data, offline, against the embedded
emulator (docs/usage.md says what it writes where).

Example::

    $ flux2-pipeline demo --workdir /tmp/flux2-demo
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from flux2_pipeline.cli.backfill import run_backfill
from flux2_pipeline.cli.instance import write_default_config
from flux2_pipeline.cli.report import PartitionSummary, format_report
from flux2_pipeline.emulator import EmulatorConfig, EmulatorServer
from flux2_pipeline.paths import as_path, iter_parquet
from flux2_pipeline.resources import Flux2Storage, RunComfyResource, SettingsError
from flux2_pipeline.settings import Settings

MARKER = ".flux2-demo"


def sample_tables(base_url: str) -> dict[str, list[dict[str, Any]]]:
    """Three small prompt tables; reference images come from the emulator's /samples route."""

    def row(row_id: str, prompt: str, images: str, **extra: Any) -> dict[str, Any]:
        names = images.split()
        urls = [name if "://" in name else f"{base_url}/samples/{name}.png" for name in names]
        return {"id": row_id, "prompt": prompt, "image_urls": urls, **extra}

    city = [
        row("city-1", "turn the street into a rainy night scene", "street", seed=1),
        row("city-2", "add neon signs to every shop front", "street neon", seed=2),
        row(
            "city-3", "make it a snowy winter evening", "plaza", seed=3, image_size="landscape_16_9"
        ),
        row("city-4", "light the windows warm orange", "towers", seed=4, output_format="jpeg"),
    ]
    products = [
        row(
            "prod-1",
            "put the sneaker on a marble pedestal",
            "sneaker",
            num_images=2,
            image_size="square",
        ),
        row(
            "prod-2",
            "place the bottle on a sunny beach",
            "bottle",
            guidance_scale=4.0,
            output_format="webp",
        ),
        row("prod-3", "studio lighting, white backdrop", "lamp", num_inference_steps=20),
    ]
    styles = [
        row("style-1", "repaint in the style of the second image", "portrait brushwork", seed=11),
        row("style-2", "combine the three references into one poster", "a b c d", seed=12),
        row("style-3", "", "portrait"),
        row("style-4", "make it a pencil sketch", "ftp://example.invalid/portrait.png"),
    ]
    return {"city-at-night": city, "product-shots": products, "style-transfer": styles}


def write_tables(folder: Path, tables: Mapping[str, list[dict[str, Any]]]) -> None:
    """Write each table as `<name>.parquet` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")


def _prepare(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise SettingsError(
                f"--workdir {workdir} exists and was not made by the demo; choose another"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by flux2-pipeline demo; deleted by the next demo run\n")


def save_previews(summaries: list[PartitionSummary], folder: Path) -> list[Path]:
    """Download the first edited image of each partition into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    with httpx.Client(timeout=30) as http:
        for summary in summaries:
            if not summary.results_path:
                continue
            first = _first_output(summary.results_path)
            if first is not None:
                row_id, url = first
                target = folder / f"{summary.partition}--{row_id}.{url.rsplit('.', 1)[-1]}"
                response = http.get(url)
                response.raise_for_status()
                target.write_bytes(response.content)
                saved.append(target)
    return saved


def _first_output(results_path: str) -> tuple[str, str] | None:
    """The first row with an output image: its id and its first output URL."""
    for batch in iter_parquet(as_path(results_path), ["row_id", "output_urls"]):
        for row_id, urls in zip(
            batch["row_id"].to_pylist(), batch["output_urls"].to_pylist(), strict=True
        ):
            if urls:
                return str(row_id), str(urls[0])
    return None


def demo_folders(workdir: str | Path) -> tuple[Path, Path, Path]:
    """The demo's input folder, output folder and Dagster home under `workdir`."""
    root = Path(workdir).absolute()
    return root / "prompts", root / "output", root / "dagster_home"


def demo_settings(workdir: str | Path, base_url: str) -> Settings:
    """Settings for the demo's folders against the emulator at `base_url` (no token)."""
    inputs, outputs, home = demo_folders(workdir)
    home.mkdir(parents=True, exist_ok=True)
    write_default_config(home)
    storage = Flux2Storage(input_dir=str(inputs), output_dir=str(outputs))
    return Settings.of(RunComfyResource(base_url=base_url), storage, dagster_home=home)


def run_demo(workdir: str | Path = "flux2-demo") -> int:
    """Run the demo; returns the process exit code."""
    root = Path(workdir).absolute()
    _prepare(root)
    config = EmulatorConfig(
        port=0,
        latency=0.5,
        max_concurrent=8,
        fault_429=0.05,
        fault_5xx=0.05,
        # A 5xx on a submit is an unknown outcome (that row would fail the run, by design):
        # the demo shows 5xx on polling, which the client rides out.
        fault_5xx_on_submit=False,
        retry_after="0.2",
        seed=7,
    )
    print(f"flux2-pipeline demo in {root}")
    inputs, outputs, _ = demo_folders(root)
    with EmulatorServer(config) as emulator:
        print(f"  emulator: {emulator.base_url} (latency 0.5 s, 5% injected 429s, 5xx on polls)")
        write_tables(inputs, sample_tables(emulator.base_url))
        settings = demo_settings(root, emulator.base_url)
        print(f"  inputs: {', '.join(sorted(p.name for p in inputs.glob('*.parquet')))}")
        report = run_backfill(settings, log_level="WARNING")
        previews = save_previews(report.partitions, root / "previews")
    print()
    print(format_report(report))
    print()
    print(f"results:   {outputs / 'flux2_edits'}")
    print(f"images:    {outputs / 'images'} (stored by sha256)")
    print(f"manifests: {outputs / 'flux2_images'} (<partition>.parquet)")
    sheets = sorted((outputs / "flux2_images").glob("*.contact.png"))
    print(f"contact:   {outputs / 'flux2_images'}/<partition>.contact.png ({len(sheets)} sheets)")
    print(f"dataset:   {outputs / 'flux2_training_dataset'} (datasets.load_dataset parquet)")
    print(f"ledger:    {settings.ledger.effective_url}")
    print(f"previews:  {root / 'previews'} ({len(previews)} edited images)")
    ui = f"flux2-pipeline ui --workdir {root}"
    print(f"UI:        {ui}  (a live emulator and dagster dev on these folders)")
    return 0 if report.succeeded and previews else 1
