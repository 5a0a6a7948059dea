"""The project's own `Definitions`, for `dagster dev -w workspace.yaml` and the CLI.

A few lines on the factory: the environment (see `flux2_pipeline.settings`) becomes the
resources, read when Dagster loads the code location, not when this module is imported.
Loading also registers the input folder's new files as partitions of DAGSTER_HOME's
instance, so a file's partition can be launched before any sensor has run.

Example::

    $ dagster dev -w workspace.yaml
"""

from dagster import Definitions, definitions

from flux2_pipeline.assets import Flux2Keys
from flux2_pipeline.assets.observe import register_partitions_on_load
from flux2_pipeline.settings import Settings


@definitions
def defs() -> Definitions:
    """flux2-pipeline configured from the environment."""
    settings = Settings.from_env()
    register_partitions_on_load(Flux2Keys(), settings.storage)
    return settings.definitions()
