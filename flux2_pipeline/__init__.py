"""flux2-pipeline: FLUX.2 [dev] image edits at scale from Dagster."""
