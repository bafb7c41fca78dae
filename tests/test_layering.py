"""DESIGN.md's layer map: a package of hecate/ imports only packages above it, never below.

A static scan (ast) of every import statement in hecate/, including imports inside
functions (a run-time import is still a dependency), against the map's order.
"""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hecate"
# Top to bottom (DESIGN.md): each may import only the ones before it. `_C` / `_extension`
# are the kernels' loader; `data` (synthetic data and token sources, not on DESIGN.md's
# map) imports no other hecate package, so it sits at the top where models and train can
# use it.
ORDER = ["_C", "_extension", "data", "ops", "comm", "moe", "parallel", "models", "train", "inference",
         "integrations", "sim", "cli"]
# Entry points run as `python -m ...`; nothing imports them.
ENTRY_POINTS = {"train/__main__.py"}


def imports_of(path: Path):
    """(imported hecate package, line) for every import of a hecate module in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from hecate import ops` imports hecate.ops
            names = [f"hecate.{a.name}" for a in node.names] if node.module == "hecate" else [node.module]
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute hecate.* imports")
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "hecate" and len(parts) > 1:
                yield parts[1], node.lineno


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.as_posix() in ENTRY_POINTS or len(rel.parts) < 2 or rel.parts[0] not in ORDER:
            continue
        layer = rel.parts[0]
        for target, line in imports_of(path):
            if target in ORDER and ORDER.index(target) > ORDER.index(layer):
                found.append(f"hecate/{rel}:{line} ({layer}) imports hecate.{target}, a lower layer")
    return sorted(found, key=lambda v: (v.split(":")[0], int(v.split(":")[1].split(" ")[0])))


def test_no_package_imports_a_lower_layer():
    assert violations() == []


def test_every_package_is_on_the_map():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - set(ORDER) <= {"testing"}  # test helpers: imported by tests only


def test_the_scan_sees_a_run_time_import(tmp_path):
    """The check can fail: a function-level import of a lower layer is found."""
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "bad.py").write_text("def f():\n    from hecate.parallel.local import X\n"
                                             "from hecate import train\n")
    assert violations(tmp_path) == [
        "hecate/moe/bad.py:2 (moe) imports hecate.parallel, a lower layer",
        "hecate/moe/bad.py:3 (moe) imports hecate.train, a lower layer",
    ]


@pytest.mark.parametrize("package", ["ops", "comm", "moe"])
def test_upper_layers_import_alone(package):
    """Importing an upper layer pulls in no lower one (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (f"import sys, hecate.{package}; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('hecate.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    allowed = set(ORDER[:ORDER.index(package) + 1])
    assert loaded <= allowed, f"hecate.{package} loads {sorted(loaded - allowed)}"


def test_strategy_interface_lives_below_the_layer_and_is_re_exported():
    moe_strategy = importlib.import_module("hecate.moe.strategy")
    from hecate.parallel.local import LocalStrategy
    from hecate.parallel.strategy import ExpertStrategy

    assert ExpertStrategy is moe_strategy.ExpertStrategy and LocalStrategy is moe_strategy.LocalStrategy
