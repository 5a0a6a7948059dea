"""The layers of docs/architecture.md hold: nothing imports upward, the core never imports Dagster.

`cli -> definitions | component -> assets -> resources -> batch | media | dataset ->
runcomfy | ledger | paths`, where `settings` (the environment turned into resources) sits
under `definitions`, and `dataset` builds on the files `batch` and `media` write. The
`emulator` stands apart: it serves the schema of `runcomfy` and only the command line
starts it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flux2_pipeline.net

PACKAGE = Path(__file__).resolve().parents[2] / "flux2_pipeline"

LAYERS: dict[str, int] = {
    "runcomfy": 0,
    "ledger": 0,
    "paths": 0,
    # The two settings the command reads before it imports Dagster.
    "run_limits": 0,
    # The one guarded door for untrusted URLs; it stands on runcomfy's retry policy.
    "net": 1,
    "batch": 2,
    "media": 2,
    "dataset": 3,
    "resources": 4,
    "assets": 5,
    "settings": 6,
    "definitions": 7,
    "component": 7,
    # The scaffolder of the component (dg scaffold defs), beside the settings.
    "component_scaffold": 6,
    # The command line: one package on top.
    "cli": 8,
}
APART = {"emulator"}
"""Stands apart: imports only `runcomfy` (the schema it serves); only the CLI imports it."""
TOP = max(LAYERS.values())

DAGSTER_FREE = [
    "flux2_pipeline",
    "flux2_pipeline.runcomfy",
    "flux2_pipeline.ledger",
    "flux2_pipeline.batch",
    "flux2_pipeline.media",
    "flux2_pipeline.dataset",
    "flux2_pipeline.paths",
    "flux2_pipeline.net",
    "flux2_pipeline.emulator",
    "flux2_pipeline.run_limits",
]


def _part(module: str) -> str:
    """`flux2_pipeline.assets.edits` -> `assets`."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("flux2_pipeline.")}


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        if name != "flux2_pipeline":
            modules.append((name, path))
    return modules


def test_every_module_has_a_layer() -> None:
    unplaced = {_part(name) for name, _ in _modules()} - set(LAYERS) - APART
    assert not unplaced, f"add these to LAYERS (and docs/architecture.md): {sorted(unplaced)}"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_nothing_imports_upward(module: str, path: Path) -> None:
    own = _part(module)
    for imported in sorted(_imports(path)):
        target = _part(imported)
        if target == own:
            continue
        if own in APART:
            assert target == "runcomfy", f"{module} imports {imported}: the emulator stands apart"
            continue
        if target in APART:
            assert LAYERS[own] == TOP, f"{module} imports the emulator; only the CLI may"
            continue
        mine, theirs = LAYERS[own], LAYERS[target]
        # The command line's modules form one layer; below it, only downward arrows.
        allowed = theirs < mine or (mine == TOP and theirs == TOP)
        assert allowed, f"{module} (layer {mine}) imports {imported} (layer {theirs})"


@pytest.mark.parametrize("module", DAGSTER_FREE)
def test_module_imports_without_dagster(module: str) -> None:
    probe = (
        f"import {module}, sys; "
        "leaked = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')); "
        "print(leaked[:3]); raise SystemExit(1 if leaked else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{module} imports Dagster: {result.stdout}{result.stderr}"


def test_net_imports_only_the_stdlib_httpx_and_the_retry_policy() -> None:
    allowed = {"httpx", "flux2_pipeline.runcomfy.retry"}
    package = Path(flux2_pipeline.net.__file__).parent
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith("flux2_pipeline.net") or top in sys.stdlib_module_names:
                    continue
                assert name in allowed, f"{source.name} imports {name}"
