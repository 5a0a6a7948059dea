"""The `flux2-pipeline` command (demo | emulator | materialize | ui); imports no Dagster.

>>> from flux2_pipeline.cli import main     # main(["materialize"]) exits with its code
"""

from flux2_pipeline.cli.commands import main

__all__ = ["main"]
