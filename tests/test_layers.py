"""The package's modules import only modules below them (README.md, Architecture): no
import circle, no upward import, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGE = CHECKOUT / "dockpoint"
#: Top to bottom, as README.md lists them; a module may import only modules after it.
LAYERS = [
    "__main__",
    "aio",
    "__init__",
    "_api",
    "_spawn",
    "_posix",
    "_posix_claim",
    "_posix_probe",
    "_posix_stream",
    "_posix_dir",
    "_windows",
    "_win32",
    "_classes",
    "_signals",
    "_names",
]


def imported(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere in it (``TYPE_CHECKING`` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x
                found |= {alias.name for alias in node.names}
            elif node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.split(".")[0] == "dockpoint":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from dockpoint import x: the facade, or a module x
                    names = {alias.name for alias in node.names}
                    found |= {n for n in names if n in LAYERS} or {"__init__"}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dockpoint":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_every_module_has_a_layer() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert sorted(LAYERS) == modules, "LAYERS (and README.md's Architecture) must list every module"


def test_modules_import_only_modules_below_them() -> None:
    upward = []
    for module in LAYERS:
        for target in sorted(imported(PACKAGE / f"{module}.py")):
            if target not in LAYERS:
                upward.append(f"{module} imports {target}, which is not a module of the package")
            elif LAYERS.index(target) <= LAYERS.index(module):
                upward.append(f"{module} imports {target}, which is not below it")
    assert not upward, "\n".join(upward)


def test_readme_lists_every_module() -> None:
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    section = readme.partition("## Architecture")[2].partition("\n## ")[0]
    missing = [m for m in LAYERS if f"`{m}.py`" not in section]
    assert not missing, f"README.md's Architecture section does not name {missing}"
