"""`Flux2Storage`: where input tables are read and datasets are written.

Example::

    storage = Flux2Storage(input_dir="data/prompts", output_dir="data/output")
    storage.input_path("cats")      # data/prompts/cats.parquet
    storage.results_path("cats")    # data/output/flux2_edits/cats.parquet
    storage.image_manifest_path("cats")  # data/output/flux2_images/cats.parquet

`output_dir` may be an object-store URI (`s3://bucket/prefix`): the output paths are
`UPath`s (see `flux2_pipeline.paths`), local folders as absolute paths. Inputs stay local.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field
from upath import UPath

from flux2_pipeline.assets_naming import partition_key_problem
from flux2_pipeline.paths import as_path


class Flux2Storage(ConfigurableResource):  # type: ignore[type-arg]
    """The input folder (one Parquet file per partition) and the output root."""

    input_dir: str = Field(default="data/prompts", description="FLUX2_INPUT_DIR.")
    output_dir: str = Field(default="data/output", description="FLUX2_OUTPUT_DIR.")

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

    def scan_inputs(self) -> tuple[dict[str, Path], dict[str, str]]:
        """Input files by partition key, and rejected file names with the reason."""
        folder = Path(self.input_dir)
        found: dict[str, Path] = {}
        rejected: dict[str, str] = {}
        if not folder.is_dir():
            return found, rejected
        for path in sorted(folder.glob("*.parquet")):
            if not path.is_file() or path.name.startswith("."):
                continue
            problem = partition_key_problem(path.stem)
            if problem:
                rejected[path.name] = problem
            else:
                found[path.stem] = path
        return found, rejected
