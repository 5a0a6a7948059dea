"""An example dg project: FLUX.2 edits of `data/prompts` configured in YAML."""
