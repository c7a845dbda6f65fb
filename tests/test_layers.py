"""Imports point down: the layer order of docs/design.md, checked on every import in the
package (lazy imports inside functions included), so an import that points up fails."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sparsekernels"
# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    {"ops"},
    {"formats"},
    {"arch"},
    {"nn"},
    {"attention"},
    {"speedup"},
    {"pruning"},
    {"distill"},
    {"recipes"},
    {"cli", "demo", "__main__"},
]
# helpers any layer may use: they import nothing from the package
ANYWHERE = {"testing"}


def rank(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"{part!r} is in no layer of tests/test_layers.py: add it to LAYERS "
                         "and to docs/design.md")


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0][:-3] if len(parts) == 1 else parts[0]


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "sparsekernels" and len(parts) > 1:
                yield node.lineno, parts[1]


MODULES = sorted(p for p in ROOT.rglob("*.py") if package_of(p) != "__init__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = package_of(path)
    if here in ANYWHERE:
        assert not list(imports(path)), f"{path} is a helper and must import nothing of ours"
        return
    for line, target in imports(path):
        if target in ANYWHERE or target.startswith("_") or target == here:
            continue
        assert rank(target) <= rank(here), (
            f"{path.relative_to(ROOT.parent)}:{line} imports sparsekernels.{target}, a layer "
            f"above {here} (order, lowest first: {[sorted(l) for l in LAYERS]})")


def test_the_check_catches_an_upward_import(tmp_path):
    fake = ROOT / "ops" / "_layer_probe.py"
    assert not fake.exists()
    source = "def f():\n    from sparsekernels.speedup import ModelSpeedup\n"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = [t for _, t in imports(probe)]
    assert found and all(rank(t) > rank("ops") for t in found)
