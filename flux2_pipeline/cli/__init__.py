"""The `flux2-pipeline` command (demo | emulator | materialize | ui); imports no Dagster.

Example::

    main(["materialize", "--partition", "cats"])    # exits with the command's code
"""

from flux2_pipeline.cli.commands import main

__all__ = ["main"]
