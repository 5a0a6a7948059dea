"""A throwaway dg project holding one component, and the chain of an error's causes.

Example:
    >>> defs = load_project(tmp_path, CONTRACT_YAML)  # a defs.yaml's text
    >>> [type(e) for e in causes(error)]
"""

from __future__ import annotations

import uuid
from pathlib import Path

from dagster import Definitions, load_from_defs_folder


def load_project(root: Path, yaml: str) -> Definitions:
    """A dg project in `root` whose defs folder holds one component, loaded."""
    package = f"flux2_project_{uuid.uuid4().hex[:8]}"
    (root / "pyproject.toml").write_text(
        f'[tool.dg]\ndirectory_type = "project"\n\n[tool.dg.project]\nroot_module = "{package}"\n'
    )
    folder = root / package / "defs" / "image_edits"
    folder.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "defs" / "__init__.py").write_text("")
    (folder / "defs.yaml").write_text(yaml)
    return load_from_defs_folder(path_within_project=root)


def causes(exc: BaseException) -> list[BaseException]:
    """The exceptions `exc` was raised from or while handling, nearest first."""
    found = []
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        found.append(exc)
    return found
