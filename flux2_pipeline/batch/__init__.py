"""The Dagster-free core of a partition run: read and validate rows, run them, write results.

Example::

    runner = EditRunner(client, ledger, partition="cats", max_concurrency=8)
    with ResultsWriter(out_path) as writer:
        async for outcome in runner.run(read_input_rows(in_path)):
            writer.write([outcome])
"""

from flux2_pipeline.batch.account_stop import AccountStop
from flux2_pipeline.batch.preflight import ReferenceCheck
from flux2_pipeline.batch.runner import (
    STATUSES,
    EditRunner,
    RunCounters,
)
from flux2_pipeline.batch.tables import (
    LARGE_ROW_GROUP_ROWS,
    RESULT_COLUMN_DESCRIPTIONS,
    RESULTS_SCHEMA,
    InputRow,
    InputShape,
    InputTableError,
    ResultsWriter,
    RowOutcome,
    RowStatus,
    file_sha256,
    input_shape,
    read_input_rows,
)

__all__ = [
    "LARGE_ROW_GROUP_ROWS",
    "RESULTS_SCHEMA",
    "RESULT_COLUMN_DESCRIPTIONS",
    "STATUSES",
    "AccountStop",
    "EditRunner",
    "InputRow",
    "InputShape",
    "InputTableError",
    "ReferenceCheck",
    "ResultsWriter",
    "RowOutcome",
    "RowStatus",
    "RunCounters",
    "file_sha256",
    "input_shape",
    "read_input_rows",
]
