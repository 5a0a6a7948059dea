"""Several Dagster runs of one `flux2-pipeline materialize` at once, each in a worker process."""
