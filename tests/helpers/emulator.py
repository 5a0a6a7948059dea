"""The emulator as the tests run it: its token, its settings, rows it serves images for.

Example:
    >>> rows = prompt_rows("http://127.0.0.1:8000", "cat", 2)
    >>> [row["id"] for row in rows]
    ['cat-0', 'cat-1']
"""

from __future__ import annotations

from typing import Any

from flux2_pipeline.emulator import EmulatorConfig

TEST_TOKEN = "tok-ZQ8xv3Lr5Hn0wPq2"


def emulator_config() -> EmulatorConfig:
    """The settings of the `emulator` fixture, for a module-scoped emulator of a test's own."""
    return EmulatorConfig(
        port=0, latency=0.05, max_concurrent=32, token=TEST_TOKEN, retry_after="0.05", seed=1
    )


def prompt_rows(base_url: str, prefix: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    """`count` valid rows whose reference images the emulator serves."""
    return [
        {
            "id": f"{prefix}-{i}",
            "prompt": f"{prefix} edit number {i}",
            "image_urls": [f"{base_url}/samples/{prefix}-{i % 3}.png"],
            "seed": i,
            **extra,
        }
        for i in range(count)
    ]
