"""Everything under `defs/` (one `Flux2EditsComponent`), loaded lazily by Dagster."""

from pathlib import Path

from dagster import Definitions, definitions, load_from_defs_folder


@definitions
def defs() -> Definitions:
    """The project's definitions: the components found under `flux2_example/defs`."""
    return load_from_defs_folder(path_within_project=Path(__file__).parent.parent)
