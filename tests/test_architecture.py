"""The layout ARCHITECTURE.md promises, checked: no import cycles (imports inside functions
count: they hide cycles, they do not remove them), evaluation does not import training,
the core imports nothing above it, and every stage script is a thin wrapper."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "speech2face"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement except those under ``if TYPE_CHECKING:`` (never executed)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:   # relative: from the module's package upwards
                    anchor = package.split(".")
                    base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    # training/encoder.py imports the face decoder inside frozen_decoder_head only
    assert "speech2face.models.face_decoder" in graph["speech2face.training.encoder"]
    assert "speech2face.core.params" in graph["speech2face.data.extract"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_layers() -> None:
    """core is the bottom; evaluation never reaches training code; models never reach the
    stages' data drivers."""
    graph = import_graph()
    for module in graph:
        reached = _reachable(graph, module)
        if module.startswith("speech2face.core"):
            assert all(m.startswith("speech2face.core") for m in reached), (module, sorted(reached))
        if module.startswith("speech2face.evaluation"):
            assert not [m for m in reached if m.startswith("speech2face.training")], module
        if module.startswith("speech2face.models"):
            assert not [m for m in reached if m.startswith(("speech2face.training", "speech2face.evaluation"))], module


def test_stage_scripts_are_thin_and_match_dvc_yaml() -> None:
    """One script per dvc.yaml stage, each well under 100 lines, calling one library
    function under run_stage (one-line errors), with no logic of its own."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    scripts = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))
    assert scripts == sorted(stages)
    for name in scripts:
        source = (ROOT / "stages" / f"{name}.py").read_text()
        tree = ast.parse(source)
        functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        assert len(source.splitlines()) < 40 and functions == ["main"], name
        assert f'run_stage("{name}", main)' in source, name
        assert f"stages/{name}.py" in stages[name]["cmd"] and f"stages/{name}.py" in stages[name]["deps"]


def test_dvc_yaml_code_deps_exist() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if dep.startswith(("src/", "stages/")):
                assert (ROOT / dep).exists(), (name, dep)
