"""The package's layout: no import cycle and no upward import, with the floors of the README.

Every module under `vishwam/` is parsed (AST, nothing imported); every `import` and
`from ... import` counts, inside function bodies too. Floors come from the table under
"## What is where" in README.md, so the picture users read is the one this test holds.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vishwam"

# Deprecated aliases that load a moved name from its new home on first use (module
# `__getattr__`): the only imports allowed to reach up, each named here.
DEPRECATED_ALIASES = {("vishwam.config", "vishwam.model.params")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floors() -> dict[str, int]:
    """`{module prefix: floor}` from the README table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What is where", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`(vishwam[\w.]*)`", cells[1]):
                table[name] = int(cells[0])
    return table


FLOORS = floors()


def floor_of(module: str) -> int:
    """The floor of the longest README prefix of `module`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise AssertionError(f"{module} has no floor: add it (or its package) to README.md's 'What is where' table")


def resolve(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The vishwam modules an import statement loads (the deepest existing module of each name)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # `from pkg import sub` loads `pkg.sub` when `sub` is a module, else `pkg`.
        targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem for alias in node.names]
    found = []
    for target in targets:
        parts = target.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        if parts and parts[0] == "vishwam":
            found.append(".".join(parts))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(t for t in resolve(module, path.name == "__init__.py", node) if t != module)
        graph[module] = edges
    return graph


def runtime_graph() -> dict[str, set[str]]:
    """The graph without the deprecated aliases' edges (they load only on attribute access)."""
    graph = {}
    for module, edges in GRAPH.items():
        graph[module] = {t for t in edges if (module, t) not in DEPRECATED_ALIASES}
    return graph


GRAPH = import_graph()


def test_every_module_has_a_floor_of_its_own():
    """Each top-level module and subpackage is named in the table (not only the package)."""
    unnamed = sorted({".".join(m.split(".")[:2]) for m in MODULES if m != "vishwam"} - set(FLOORS))
    assert not unnamed, f"add {unnamed} to README.md's 'What is where' table"


def test_the_readme_table_is_read():
    assert FLOORS["vishwam.kernels"] < FLOORS["vishwam.nn"] < FLOORS["vishwam.model"] < FLOORS["vishwam.train"]
    assert len(MODULES) > 40 and sum(len(e) for e in GRAPH.values()) > 100


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    upward = [f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
              for target in sorted(GRAPH[module])
              if floor_of(target) > floor_of(module) and (module, target) not in DEPRECATED_ALIASES]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: none may hold two modules."""
    graph = runtime_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_what_they_are_for():
    """The resolver sees function-level and relative imports, so the checks above can fail."""
    source = "def f():\n    from ..train import step\n    import vishwam.plan\n"
    node_a, node_b = (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom | ast.Import))
    assert resolve("vishwam.nn.block", False, node_a) == ["vishwam.train.step"]
    assert resolve("vishwam.nn.block", False, node_b) == ["vishwam.plan"]
    assert floor_of("vishwam.train.step") > floor_of("vishwam.nn.block")
