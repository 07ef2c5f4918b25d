"""The package is layered: no module imports, directly or through others, a module that imports it back, no
package imports a package that imports it back, and none imports a module of a layer above its own in the
table of docs/development/layout.md ("How the code is laid out"). bench/ is checked with clara/: it sits on top.

The check parses clara/ and bench/ (no import is executed) and follows every `import clara...` /
`from clara... import` (and bench's) statement, at module level or inside functions alike, since an import
deferred into a function is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "clara"
LAYOUT = REPO / "docs" / "development" / "layout.md"
CHECKED = ("clara", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_checked(name: str) -> bool:
    return name.split(".")[0] in CHECKED


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The clara and bench modules `path` imports; `from clara.x import y` counts as clara.x.y when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if is_checked(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and is_checked(node.module):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(p for folder in CHECKED for p in (REPO / folder).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): project_imports(p, modules) for p in paths}


def package_of(module: str) -> str:
    """The unit a package-level loop is looked for in: a sub-package of clara (clara.model for clara.model.collate),
    a top-level module of clara (clara.config), or bench."""
    parts = module.split(".")
    if parts[0] == "bench":
        return "bench"
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return module


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(package_of(name), set()).update(package_of(dep) for dep in deps)
    return {name: deps - {name} for name, deps in packages.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def readme_layers() -> list[tuple[str, list[str]]]:
    """(layer, entries) of the layer table (docs/development/layout.md), bottom first; an entry is `x.py`, `package/` or
    `package/x.py`, relative to clara/, or `bench/`."""
    section = LAYOUT.read_text(encoding="utf-8").split("# How the code is laid out", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("|")]
    return [(layer.strip(), re.findall(r"`([^`]+)`", entries)) for layer, entries in rows[2:]]


def entry_module(entry: str) -> str:
    """`index/` -> clara.index (and what is below it), `index/__main__.py` -> clara.index.__main__,
    `bench/` -> bench."""
    parts = entry.rstrip("/").removesuffix(".py").split("/")
    top = [] if parts[0] == "bench" else ["clara"]
    return ".".join([*top, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def assign_layers(modules: set[str], table: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Each module's layer (its index in the table): that of the most specific entry naming it or a package above it."""
    found: dict[str, tuple[int, int]] = {}
    for number, (_, entries) in enumerate(table):
        for entry in entries:
            named = entry_module(entry)
            for module in modules:
                if module == named or (entry.endswith("/") and module.startswith(named + ".")):
                    depth = named.count(".") + (0 if entry.endswith("/") else 1)
                    if module not in found or depth > found[module][1]:
                        found[module] = (number, depth)
    return {module: number for module, (number, _) in found.items()}


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """'a imports b' for every import of a module in a layer above the importer's."""
    return [
        f"{name} imports {dep}"
        for name, deps in sorted(graph.items())
        for dep in sorted(deps)
        if name in layers and dep in layers and layers[dep] > layers[name]
    ]


def test_every_module_has_a_layer_in_the_readme():
    graph = import_graph()
    layers = assign_layers(set(graph), readme_layers())
    missing = sorted(set(graph) - set(layers))
    assert not missing, f"modules missing from the layer table of docs/development/layout.md: {missing}"


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    table = readme_layers()
    layers = assign_layers(set(graph), table)
    upward = [
        f"{line} ({table[layers[line.split()[0]]][0]} -> {table[layers[line.split()[-1]]][0]})"
        for line in upward_imports(graph, layers)
    ]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_the_layer_check_finds_an_upward_import():
    table = [("bottom", ["errors.py", "data/"]), ("middle", ["model.py", "data/cli.py"]), ("top", ["train.py"])]
    graph = {
        "clara.errors": set(),
        "clara.data": {"clara.errors"},
        "clara.data.load": {"clara.data"},
        "clara.data.cli": {"clara.model"},
        "clara.model": {"clara.data.load"},
        "clara.train": {"clara.model"},
    }
    layers = assign_layers(set(graph) | {"clara.stray"}, table)
    assert layers == {
        "clara.errors": 0,
        "clara.data": 0,
        "clara.data.load": 0,
        "clara.data.cli": 1,
        "clara.model": 1,
        "clara.train": 2,
    }
    assert upward_imports(graph, layers) == []
    graph["clara.data.load"] = {"clara.train"}
    assert upward_imports(graph, layers) == ["clara.data.load imports clara.train"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 10  # the parse found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_imports_a_package_that_imports_it_back():
    """A loop between packages (clara.model -> clara.stages -> clara.model) means a module sits in the wrong one."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_the_package_cycle_check_finds_a_loop_through_different_modules():
    graph = {
        "clara.model.collate": {"clara.stages.stage1"},
        "clara.stages.stage1": {"clara.stages.prompts"},
        "clara.stages.prompts": {"clara.model.topk"},
        "clara.model.topk": set(),
        "bench.child": {"clara.config"},
        "clara.config": set(),
    }
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["clara.model", "clara.stages", "clara.model"]


def test_bench_is_checked_and_sits_on_top():
    graph = import_graph()
    layers = assign_layers(set(graph), readme_layers())
    assert "bench.child" in graph and any(dep.startswith("clara.") for dep in graph["bench.child"])
    assert layers["bench.child"] == max(layers.values())
    assert not any(dep.startswith("bench") for name, deps in graph.items() if name.startswith("clara") for dep in deps)


def is_alias(path: Path) -> bool:
    """A module kept only so that an old `python -m clara.X` path works: imports and a `__main__` guard."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    body = body[1:] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body
    guard = [n for n in body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    return len(guard) == 1 and all(isinstance(n, (ast.Import, ast.ImportFrom)) or n in guard for n in body)


def test_the_top_level_holds_at_most_twelve_modules_with_code():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if not is_alias(p))
    aliases = sorted(p.name for p in PACKAGE.glob("*.py") if is_alias(p))
    assert len(modules) <= 12, f"clara/ holds {len(modules)} modules with code: {modules} (aliases: {aliases})"


def test_each_sub_package_names_its_modules_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")) + sorted(PACKAGE.glob("*/*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert doc, f"{init.relative_to(REPO)} has no docstring"
        for module in sorted(p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py"):
            assert re.search(rf"\b{re.escape(module)}\b", doc), (
                f"{init.relative_to(REPO)}'s docstring does not name {module}"
            )
        assert "import" in doc, f"{init.relative_to(REPO)}'s docstring does not say what the package may import"


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_its_command_line_imports_the_synthesis_package():
    graph = import_graph()
    importers = {
        name
        for name, deps in graph.items()
        if not name.startswith("clara.synthesis") and any(dep.startswith("clara.synthesis") for dep in deps)
    }
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
        source = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not source.exists():
            source = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        heavy = [alias.name for n in top_level if isinstance(n, ast.Import) for alias in n.names] + [
            n.module for n in top_level if isinstance(n, ast.ImportFrom) and n.module
        ]
        assert not any(h.split(".")[0] in ("torch", "transformers", "datasets", "deepspeed", "peft") for h in heavy), (
            f"{name} imports {heavy} at module level"
        )


def test_the_installed_package_runs_from_any_directory(tmp_path):
    """requirements.txt installs this repository as the clara package, with its command lines."""
    import shutil
    import subprocess
    import sys

    for command in (
        ["clara-train", "--help"],
        ["clara-evaluate", "--help"],
        [sys.executable, "-m", "clara.train", "--help"],
    ):
        if shutil.which(command[0]) is None and command[0] != sys.executable:
            raise AssertionError(f"{command[0]} is not on PATH: pip install -r requirements.txt installs it")
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--checkpoint" in proc.stdout or "--stage" in proc.stdout
