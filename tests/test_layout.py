"""The package is layered: no module imports, directly or through others, a module that imports it back.

The check parses clara/ (no import is executed) and follows every `import clara...` / `from clara... import`
statement, at module level or inside functions alike, since an import deferred into a function is still
a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clara"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def clara_imports(path: Path, modules: set[str]) -> set[str]:
    """The clara modules `path` imports; `from clara.x import y` counts as clara.x.y when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("clara"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clara"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): clara_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 10  # the parse found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_its_command_line_imports_the_synthesis_package():
    graph = import_graph()
    importers = {name for name, deps in graph.items() if not name.startswith("clara.synthesis")
                 and any(dep.startswith("clara.synthesis") for dep in deps)}
    assert importers == {"clara.synthesize"}


def test_the_bottom_layer_does_not_load_torch():
    """The settings are resolved by the launchers before anything heavy starts (clara.launch)."""
    graph = import_graph()
    below_config: set[str] = set()
    todo = ["clara.config"]
    while todo:
        name = todo.pop()
        if name not in below_config:
            below_config.add(name)
            todo.extend(graph[name])
    for name in below_config:
        source = (PACKAGE.parent / (name.replace(".", "/") + ".py"))
        if not source.exists():
            source = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        heavy = [alias.name for n in top_level if isinstance(n, ast.Import) for alias in n.names] + \
                [n.module for n in top_level if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(h.split(".")[0] in ("torch", "transformers", "datasets", "deepspeed", "peft") for h in heavy), \
            f"{name} imports {heavy} at module level"


def test_the_installed_package_runs_from_any_directory(tmp_path):
    """requirements.txt installs this repository as the clara package, with its command lines."""
    import shutil
    import subprocess
    import sys

    for command in (["clara-train", "--help"], ["clara-evaluate", "--help"],
                    [sys.executable, "-m", "clara.train", "--help"]):
        if shutil.which(command[0]) is None and command[0] != sys.executable:
            raise AssertionError(f"{command[0]} is not on PATH: pip install -r requirements.txt installs it")
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--checkpoint" in proc.stdout or "--stage" in proc.stdout
