"""What `dg scaffold defs flux2_pipeline.Flux2EditsComponent <path>` writes.

- `<path>/defs.yaml`: every attribute of the component, each with its description as a
  comment; the ones a first project needs are set, the rest are commented out with an
  example value;
- a sample prompt table `example.parquet` in the input folder, whose reference images the
  flux2-pipeline emulator serves (at RUNCOMFY_BASE_URL when that is a loopback address,
  else http://127.0.0.1:8188); for the real API, give rows images it can fetch;
- a note of the environment variables the `defs.yaml` reads.

Example::

    $ dg scaffold defs flux2_pipeline.Flux2EditsComponent image_edits
    $ flux2-pipeline emulator &          # or point RUNCOMFY_BASE_URL at the real API
    $ dg launch --assets flux2_edits --partition example
"""

from __future__ import annotations

import importlib
import json
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from dagster.components import Scaffolder, ScaffoldRequest, scaffold_component
from pydantic.fields import FieldInfo

from flux2_pipeline.resources import SETTINGS, is_loopback

EMULATOR_URL = "http://127.0.0.1:8188"
"""Where `flux2-pipeline emulator` listens by default."""
SAMPLE_PARTITION = "example"

FROM_ENV = ("base_url", "api_token", "ledger_url")
"""Attributes written as `{{ env.<their variable> }}`."""

SET = ("input_dir", "output_dir", *FROM_ENV, "max_concurrency", "step_retries", "backfill_policy")
"""Attributes written set (the rest commented out): what a first project needs."""


def _from_env(name: str) -> str:
    return f"{{{{ env.{SETTINGS[name].variable} }}}}"


VALUES: dict[str, Any] = {
    **{name: _from_env(name) for name in FROM_ENV},
    "backfill_policy": "single_run",  # ready for `dg launch --partition-range`
    "account_base_url": _from_env("account_base_url"),
    "account_concurrency": 32,
    "budget_usd": 100,
    "price_per_image_usd": 0.025,
    "defaults": {"image_size": "landscape_4_3", "num_inference_steps": 28},
    "key_prefix": "team_a",
    "pool": "runcomfy_account",
    "translation": {"owners": ["team:ml"], "tags": {"stage": "{{ asset }}"}},
    "assets": {
        "flux2_edits": {"automation_condition": "{{ automation_condition.eager() }}"},
    },
}
"""Each attribute's value when not its default (an example, for those without one)."""

ENVIRONMENT = {str(SETTINGS[name].variable): SETTINGS[name].meaning for name in FROM_ENV}
"""The environment variables the scaffolded defs.yaml reads, and what each one is."""


def sample_rows(base_url: str) -> list[dict[str, Any]]:
    """Three rows of the sample prompt table, their images served by the emulator."""
    base = base_url.rstrip("/")
    return [
        {
            "id": "example-1",
            "prompt": "make it a watercolor painting",
            "image_urls": [f"{base}/samples/street.png"],
        },
        {
            "id": "example-2",
            "prompt": "turn the scene to night with neon signs",
            "image_urls": [f"{base}/samples/plaza.png"],
            "image_size": "landscape_4_3",
        },
        {
            "id": "example-3",
            "prompt": "put the product on a marble table",
            "image_urls": [f"{base}/samples/bottle.png", f"{base}/samples/lamp.png"],
            "seed": 7,
        },
    ]


def defs_yaml(type_name: str, fields: Mapping[str, FieldInfo]) -> str:
    """The commented `defs.yaml`: every attribute of `fields`, in its order."""
    lines = [
        "# FLUX.2 [dev] image edits of a folder of prompt tables (flux2-pipeline).",
        "# Check it with `dg check yaml` and `dg check defs`; launch a file's partition with",
        f"# `dg launch --assets flux2_edits --partition {SAMPLE_PARTITION}`.",
        f"# The emulator (`flux2-pipeline emulator`) listens at {EMULATOR_URL}.",
        "# Environment variables read below:",
        *(f"#   {name}: {meaning}" for name, meaning in ENVIRONMENT.items()),
        f"type: {type_name}",
        "attributes:",
    ]
    for name, info in fields.items():
        lines.append("")
        lines.extend(
            textwrap.wrap(
                info.description or "", 88, initial_indent="  # ", subsequent_indent="  # "
            )
        )
        value = _yaml(VALUES.get(name, info.default))
        lines.append(f"  {name}: {value}" if name in SET else f"  # {name}: {value}")
    return "\n".join(lines) + "\n"


def _yaml(value: Any) -> str:
    # JSON is YAML: one line, quoted where it must be.
    return json.dumps(value) if not isinstance(value, str) or "{{" in value else value


class Flux2EditsScaffolder(Scaffolder):
    """Writes the commented defs.yaml and the sample prompt table; lists the variables."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        """Write the files of a new `Flux2EditsComponent` at `request.target_path`."""
        if request.scaffold_format != "yaml":
            scaffold_component(request)
            return
        # The type being scaffolded (a subclass gets its own attributes), by name: this
        # module sits under the component, which uses it.
        module, _, name = request.type_name.rpartition(".")
        model = getattr(importlib.import_module(module), name).model()
        target = Path(request.target_path)
        target.mkdir(parents=True, exist_ok=True)
        (target / "defs.yaml").write_text(defs_yaml(request.type_name, model.model_fields))
        root = Path(request.project_root) if request.project_root else target
        sample = write_sample_table(root / str(model.model_fields["input_dir"].default))
        print(f"flux2: wrote {target / 'defs.yaml'} (every attribute, described)")
        print(f"flux2: wrote the sample prompt table {sample} (partition {SAMPLE_PARTITION!r})")
        print("flux2: the defs.yaml reads these environment variables:")
        for name, meaning in ENVIRONMENT.items():
            print(f"  {name}: {meaning}")


def write_sample_table(folder: Path) -> Path:
    """The sample prompt table, unless the folder already holds one of that name."""
    path = folder / f"{SAMPLE_PARTITION}.parquet"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        configured = os.environ.get("RUNCOMFY_BASE_URL", "")
        base_url = configured if is_loopback(configured) else EMULATOR_URL
        table = pa.Table.from_pylist(
            sample_rows(base_url),
            schema=pa.schema(
                [
                    ("id", pa.string()),
                    ("prompt", pa.string()),
                    ("image_urls", pa.list_(pa.string())),
                    ("image_size", pa.string()),
                    ("seed", pa.int64()),
                ]
            ),
        )
        pq.write_table(table, path)
    return path
