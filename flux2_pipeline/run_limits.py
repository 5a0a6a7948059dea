"""How a backfill is cut into Dagster runs: the variables and defaults of its two settings.

`FLUX2_PARTITIONS_PER_RUN` is the most partitions one run covers; `FLUX2_PARALLEL_PARTITIONS`
how many runs `flux2-pipeline materialize` runs at once (`Settings` reads and checks both).
This module imports nothing: the command guesses from them, before it imports Dagster,
whether it will want its worker server (`flux2_pipeline.cli.pool.server.likely_needed`).

>>> DEFAULT_PARTITIONS_PER_RUN, DEFAULT_PARALLEL_PARTITIONS
(25, 4)
"""

PARTITIONS_PER_RUN_VARIABLE = "FLUX2_PARTITIONS_PER_RUN"
DEFAULT_PARTITIONS_PER_RUN = 25
"""Most partitions in one run of a backfill (FLUX2_PARTITIONS_PER_RUN)."""
PARALLEL_PARTITIONS_VARIABLE = "FLUX2_PARALLEL_PARTITIONS"
DEFAULT_PARALLEL_PARTITIONS = 4
MOST_PARALLEL_PARTITIONS = 64
"""The most Dagster runs one command runs at once (`--parallel`)."""
