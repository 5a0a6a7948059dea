"""The project's own `Definitions`, for `dagster dev -w workspace.yaml` and the CLI.

A few lines on the factory: the environment (see `flux2_pipeline.settings`) becomes the
resources, read when Dagster loads the code location, not when this module is imported.

Example::

    $ dagster dev -w workspace.yaml
"""

from dagster import Definitions, definitions

from flux2_pipeline.settings import Settings


@definitions
def defs() -> Definitions:
    """flux2-pipeline configured from the environment."""
    return Settings.from_env().definitions()
