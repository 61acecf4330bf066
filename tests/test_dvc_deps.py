"""dvc.yaml's deps cover every file each stage runs: the import closure (ast, within this repo) of
the module its `cmd` starts, plus the data files those modules open beside themselves. A stale
stage reported as up to date is the worst bug a DVC pipeline can have; this test makes a stage
whose code grows without its deps fail, naming the missing paths."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("slimforge", "stages", "kernels", "flows", "experiments")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a dotted module name inside the repo (a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, root: Path) -> set[str]:
    """Dotted names a file imports (anywhere in it, functions included), absolute, repo-only.
    `from a.b import c` yields a.b and a.b.c (c may be a submodule); `stage_main("a.b", ...)` a.b
    (the stage entry imports its module by name, after checking the params)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__")
    else:
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "stage_main" and node.args
              and isinstance(node.args[0], ast.Constant)):  # stage_main("stages.x.stage"): imported by name
            names.add(node.args[0].value)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _data_files(path: Path) -> set[Path]:
    """Non-Python files beside a module that it names in a string (e.g. a shipped JSON table)."""
    text = path.read_text()
    return {f for f in path.parent.iterdir() if f.is_file() and f.suffix != ".py" and not f.name.startswith(".")
            and re.search(rf"[\"']{re.escape(f.name)}[\"']", text)}


def import_closure(entry: str, root: Path = REPO) -> set[Path]:
    """Every repo file that running `python -m entry` imports or opens beside its modules (for a
    package, `python -m` runs its __main__.py after its __init__.py)."""
    todo, seen = [entry], set()
    if (root.joinpath(*entry.split(".")) / "__main__.py").is_file():
        todo.append(f"{entry}.__main__")
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:i]), root)
            if path is not None and path not in files:
                files.add(path)
                files |= _data_files(path)
                todo += sorted(_imported_names(path, root))
    return files


def stage_modules(dvc: dict) -> dict[str, str]:
    """{stage: the module its cmd runs with `python -m`}."""
    out = {}
    for stage, spec in dvc["stages"].items():
        match = re.search(r"python -m ([\w.]+)", spec["cmd"])
        assert match, f"stage {stage}: cmd does not run `python -m <module>`: {spec['cmd']}"
        out[stage] = match.group(1)
    return out


def code_deps(closure: set[Path], root: Path = REPO) -> list[str]:
    """The shortest dep list that covers `closure` and nothing else: a folder where the closure holds
    every file in it, the files themselves otherwise (so a benchmark script beside a stage's code, or
    an unused helper, is not a dep and editing it reruns nothing)."""
    def files_in(folder: Path) -> set[Path]:
        return {f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                and not f.name.startswith(".")}

    out: list[str] = []

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.is_file() and child in closure:
                out.append(str(child.relative_to(root)))
            elif child.is_dir() and child.name != "__pycache__" and files_in(child) & closure:
                if files_in(child) <= closure:
                    out.append(str(child.relative_to(root)))
                else:
                    walk(child)

    for package in PACKAGES:
        if (root / package).is_dir():
            walk(root / package)
    return out


def missing_deps(deps: list, closure: set[Path], root: Path = REPO) -> list[str]:
    """Closure files that no dep (a file, or a folder above it) covers."""
    covered = [root / (d if isinstance(d, str) else next(iter(d))) for d in deps]
    return sorted(str(f.relative_to(root)) for f in closure
                  if not any(f == c or c in f.parents for c in covered))


def resolve_vars(dvc: dict, root: Path = REPO) -> dict:
    """dvc.yaml with its `${key}` / `${a.b}` templates filled from the `vars` files, as DVC does."""
    values = {}
    for entry in dvc.get("vars", []):
        file, _, keys = entry.partition(":")
        data = yaml.safe_load((root / file).read_text())
        values.update({k: data[k] for k in keys.split(",")} if keys else data)

    def lookup(match):
        value = values
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    text = re.sub(r"\$\{([\w.]+)\}", lookup, yaml.safe_dump(dvc))
    return yaml.safe_load(text)


DVC = resolve_vars(yaml.safe_load((REPO / "dvc.yaml").read_text()))
STAGES = stage_modules(DVC)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_code_the_stage_runs(stage):
    closure = import_closure(STAGES[stage])
    assert module_file(STAGES[stage]) in closure and len(closure) > 3
    missing = missing_deps(DVC["stages"][stage]["deps"], closure)
    assert not missing, f"dvc.yaml stage '{stage}' runs these files but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_the_code_the_stage_runs(stage):
    declared = [d for d in DVC["stages"][stage]["deps"] if d.split("/")[0] in PACKAGES]
    expected = code_deps(import_closure(STAGES[stage]))
    assert declared == expected, (f"dvc.yaml stage '{stage}': code deps should be exactly (in this order):\n"
                                  + "\n".join(f"      - {d}" for d in expected))


def test_code_deps_list_a_folder_only_when_all_of_it_runs(tmp_path):
    pkg = tmp_path / "stages" / "s"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "run.py", "bench.py"):
        (pkg / name).write_text("")
    (tmp_path / "stages" / "__init__.py").write_text("")
    closure = {tmp_path / "stages" / "__init__.py", pkg / "__init__.py", pkg / "run.py"}
    assert code_deps(closure, tmp_path) == ["stages/__init__.py", "stages/s/__init__.py", "stages/s/run.py"]
    assert code_deps(closure | {pkg / "bench.py"}, tmp_path) == ["stages/__init__.py", "stages/s"]


def test_a_removed_dep_is_caught_and_named():
    closure = import_closure(STAGES["prune"])
    deps = DVC["stages"]["prune"]["deps"]
    assert missing_deps(deps, closure) == []
    surgery = REPO / "slimforge/pruning/surgery.py"
    assert surgery in closure  # prune cuts the model with it
    trimmed = [d for d in deps if d not in ("slimforge/pruning", "slimforge/pruning/surgery.py")]
    assert "slimforge/pruning/surgery.py" in missing_deps(trimmed, closure)


def test_closure_follows_relative_imports_function_level_imports_and_data_files(tmp_path):
    pkg = tmp_path / "slimforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n\ndef f():\n    from slimforge.c import g\n")
    (pkg / "sub" / "b.py").write_text("TABLE = 'table.json'\n")
    (pkg / "sub" / "table.json").write_text("{}")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    got = {str(p.relative_to(tmp_path)) for p in import_closure("slimforge.sub.a", tmp_path)}
    assert got == {"slimforge/__init__.py", "slimforge/sub/__init__.py", "slimforge/sub/a.py",
                   "slimforge/sub/b.py", "slimforge/sub/table.json", "slimforge/c.py"}


@pytest.mark.parametrize("stage", ["base", "prune", "quantize", "filter", "lora", "rl", "package"])
def test_deps_cover_the_data_files_the_shipped_params_make_the_stage_read(stage):
    import importlib

    from slimforge.config import load_params

    module = importlib.import_module(f"stages.{stage}.stage")
    schema = importlib.import_module(f"stages.{stage}.params")
    name = {"base": "BaseParams", "prune": "PruneParams", "quantize": "QuantizeParams", "filter": "FilterParams",
            "lora": "LoraParams", "rl": "RlParams", "package": "PackageParams"}[stage]
    params = load_params(REPO / "params" / f"{stage}.yaml", getattr(schema, name))
    reads = {f"data/tasks/{f}" for f in module.suite_files(params)}
    if stage == "lora":
        reads |= {params.model, params.train_rows}
    if stage == "filter":
        reads |= {params.targets, params.pool, params.judge}  # the pipeline's judge is a path, never null
    deps = set(DVC["stages"][stage]["deps"])
    assert reads and not reads - deps, f"dvc.yaml stage '{stage}' reads {sorted(reads - deps)} without a dep on them"
    assert "data/tasks" not in deps  # per-file deps: a change to another stage's files does not rerun this one


def test_templated_deps_follow_the_params(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "lora.yaml").write_text("model: data/quantized\ntrain_rows: data/filtered/filtered.jsonl\n")
    dvc = {"vars": ["params/lora.yaml:model,train_rows"], "stages": {"lora": {"deps": ["${model}", "${train_rows}"]}}}
    assert resolve_vars(dvc, tmp_path)["stages"]["lora"]["deps"] == ["data/quantized", "data/filtered/filtered.jsonl"]


def test_base_depends_on_every_key_it_reads_and_only_the_chosen_preset():
    from stages.base.params import BaseParams

    declared = next(v for p in DVC["stages"]["base"]["params"] if isinstance(p, dict)
                    for k, v in p.items() if k == "params/base.yaml")
    shipped = yaml.safe_load((REPO / "params/base.yaml").read_text())
    assert f"presets.{shipped['preset']}" in declared and "presets" not in declared
    assert set(declared) - {f"presets.{shipped['preset']}"} == set(BaseParams.model_fields) - {"presets"}
