"""dvc.yaml cannot drift from the code: every stage depends on exactly the pipeline modules its command imports.

A module a stage imports but does not list would let `dvc repro` skip the stage after that module changed,
so its outputs would no longer be what the code produces. The closure is computed statically: the
module-level imports of `pipeline/__main__.py`, the imports inside the stage's handler, then every import
anywhere in each module reached (function-level imports included, so the closure is a superset of what
runs). Importing `pipeline.a.b` runs `pipeline/a/__init__.py` too, so packages count. Imports by name at
run time (`importlib`, the ingest source kinds) are not seen; dvc.yaml lists those by template. The converse
holds too: a listed module the stage never imports would re-run it (and every stage after it) for nothing, as a
stage once re-ran the shift audit whenever evaluate's own code changed.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
from dvc.repo import Repo

from pipeline.__main__ import build_parser

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The file of a `pipeline...` module or package, relative to the repository root."""
    parts = name.split(".")
    if parts[0] != "pipeline":
        return None
    for candidate in (Path(*parts).with_suffix(".py"), Path(*parts) / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def imported_files(nodes) -> set[Path]:
    """Files of the pipeline modules (and their packages) that these AST nodes import."""
    names: list[str] = []
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names += [alias.name for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.append(sub.module)
                # `from pipeline.audit import shift` imports the submodule when there is one
                names += [f"{sub.module}.{alias.name}" for alias in sub.names]
    files = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # the packages on the way are imported too
            found = module_file(".".join(parts[:end]))
            if found:
                files.add(found)
    return files


def import_closure(start: set[Path], seen: set[Path]) -> set[Path]:
    """Every file reachable from `start`; files already in `seen` are kept but not followed."""
    seen = set(seen)
    todo = list(start - seen)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported_files([ast.parse((ROOT / path).read_text())]) - seen
    return seen


def stage_imports(cmd: str) -> set[Path]:
    """The pipeline files a `python -m pipeline <command> ...` stage command can import."""
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "pipeline"], f"not a pipeline command: {cmd}"
    handler = build_parser().parse_args(argv[3:]).handler.__name__
    tree = ast.parse((ROOT / "pipeline" / "__main__.py").read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == handler]
    assert body, f"handler {handler} not found in pipeline/__main__.py"
    main = Path("pipeline/__main__.py")  # only its top and the handler run, not every stage's imports
    return import_closure(imported_files(top + body), seen={main})


def missing_deps(cmd: str, deps: list[str]) -> list[str]:
    """Imported pipeline files that no dependency (a file, or a folder above it) covers."""
    covered = [Path(dep) for dep in deps]
    return sorted(path.as_posix() for path in stage_imports(cmd)
                  if not any(path == dep or dep in path.parents for dep in covered))


SOURCE_KINDS = Path("pipeline/sources")  # imported by name at run time: the ingest stage lists its own by template


def extra_deps(cmd: str, deps: list[str]) -> list[str]:
    """Listed pipeline files and folders that cover none of the files the stage imports."""
    imported = stage_imports(cmd)
    return sorted({dep for dep in deps if dep.startswith("pipeline/") and Path(dep).parent != SOURCE_KINDS
                   and not any(path == Path(dep) or Path(dep) in path.parents for path in imported)})


def dvc_stages() -> list[tuple[str, str, list[str]]]:
    with Repo(str(ROOT)) as repo:
        return [(stage.addressing, stage.cmd, [dep.def_path for dep in stage.deps]) for stage in repo.index.stages]


STAGES = dvc_stages()


@pytest.mark.parametrize(("stage", "cmd", "deps"), STAGES, ids=[s[0] for s in STAGES])
def test_every_imported_module_is_a_dependency(stage: str, cmd: str, deps: list[str]):
    missing = missing_deps(cmd, deps)
    assert not missing, f"dvc.yaml stage {stage} imports {', '.join(missing)} but does not list it under deps"


@pytest.mark.parametrize(("stage", "cmd", "deps"), STAGES, ids=[s[0] for s in STAGES])
def test_every_listed_module_is_imported(stage: str, cmd: str, deps: list[str]):
    extra = extra_deps(cmd, deps)
    assert not extra, f"dvc.yaml stage {stage} lists {', '.join(extra)} but never imports it"


def test_a_removed_dependency_is_named():
    stage, cmd, deps = next(s for s in STAGES if s[0] == "report")
    registry = "pipeline/registry.py"
    assert Path(registry) in stage_imports(cmd) and registry in deps
    assert missing_deps(cmd, [d for d in deps if d != registry]) == [registry]
    # a folder dependency covers the modules inside it
    assert Path("pipeline/report/judge.py") in stage_imports(cmd) and "pipeline/report" in deps
    assert "pipeline/report/judge.py" in missing_deps(cmd, [d for d in deps if d != "pipeline/report"])
    assert missing_deps(cmd, [d for d in deps if not d.startswith("pipeline/")] + ["pipeline"]) == []
    # and a listed module the stage never imports
    assert extra_deps(cmd, deps) == [] and extra_deps(cmd, deps + ["pipeline/pretrain.py"]) == ["pipeline/pretrain.py"]


def test_package_and_submodule_imports_are_followed():
    closure = stage_imports("python -m pipeline ingest synthetic")
    assert {Path("pipeline/sources/__init__.py"), Path("pipeline/sources/records.py"),
            Path("pipeline/ingest.py"), Path("pipeline/__init__.py")} <= closure
    assert Path("pipeline/report/stage.py") not in closure
