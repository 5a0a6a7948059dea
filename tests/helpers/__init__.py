"""Helpers shared by the tests; test modules import these, never each other.

- `emulator`: the test token, the emulator's test settings, rows of prompts it serves.
- `tables`: Parquet tables and a partition's stored files, written directly.
- `net`: loopback ports, held refused or free, and a resolver to loopback.
- `waiting`: `wait_until`, the one way a test polls for a state.
- `environment`: the settings' environment of an in-process pipeline, for tests.
- `cli`: the `flux2-pipeline` command as a subprocess, and what its runs recorded.
- `postgres`: the `postgres` marker's guard and a fresh database on the local server.
- `sensors`, `component`, `images`, `datasets`: what the tests of those parts share.
"""
