"""flux2-pipeline's Definitions with every step sent to Dagster's Celery workers.

The code location of the Celery deployment (see deploy/README.md). It takes the project's
`Definitions` as they are and only sets `dagster_celery.celery_executor`, configured from
the environment, so the workers and the runs agree on one broker::

    export DAGSTER_CELERY_BROKER_URL=redis://127.0.0.1:6379/0
    export DAGSTER_CELERY_BACKEND_URL=redis://127.0.0.1:6379/0
    dagster asset materialize -f deploy/celery/definitions.py \\
        --select flux2_edits,flux2_images --partition cats
"""

from __future__ import annotations

from dagster import Definitions, ExecutorDefinition
from dagster_celery import celery_executor

from flux2_pipeline.settings import Settings

BROKER_ENV = "DAGSTER_CELERY_BROKER_URL"
BACKEND_ENV = "DAGSTER_CELERY_BACKEND_URL"


def celery_executor_from_env() -> ExecutorDefinition:
    """`celery_executor` reading its broker and result backend from the environment.

    The same two variables feed deploy/celery/celery.yaml, which the workers start with.
    """
    return celery_executor.configured(
        {"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV}},
        name="flux2_celery",
    )


def with_celery_executor(defs: Definitions) -> Definitions:
    """`defs` with every job's steps running on Celery workers (`defs` sets no executor)."""
    return Definitions.merge(defs, Definitions(executor=celery_executor_from_env()))


defs = with_celery_executor(Settings.from_env().definitions())
