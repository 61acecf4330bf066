"""Dependencies point one way: kernels <- slimforge <- stages <- experiments; flows drive stages
through DVC and import neither stages nor experiments."""

import ast

import pytest

from tests.conftest import REPO

# package -> packages it must never import
FORBIDDEN = {"kernels": {"slimforge", "stages", "flows", "experiments"},
             "slimforge": {"stages", "flows", "experiments"},
             "stages": {"flows", "experiments"}, "flows": {"stages", "experiments"}, "experiments": {"flows"}}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = [(str(p.relative_to(REPO)), mod) for p in (REPO / package).rglob("*.py")
           for mod in _imports(p) if mod in FORBIDDEN[package]]
    assert bad == []


def test_stages_do_not_import_each_other():
    bad = []
    for stage in (REPO / "stages").iterdir():
        if not stage.is_dir() or stage.name.startswith("_"):
            continue
        for p in stage.rglob("*.py"):
            tree = ast.parse(p.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
                    if node.module.split(".")[1] != stage.name:
                        bad.append((str(p.relative_to(REPO)), node.module))
    assert bad == []
