"""The package's import rules, read from every module's source (imports inside functions and
under TYPE_CHECKING count too):

- the shards import neither the gateway nor the clients;
- the gateway imports neither torch nor the shards;
- the client library (the modules at the top of clients/, the `shardgate` command aside)
  imports neither torch, the gateway nor the shards;
- the leaf modules in proto/ import none of the gateway, the shards, the clients or torch;
- no import cycles among shardgate modules, lazy imports included (a cycle a function-level
  import hides is still two modules that need each other).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"proto": "shardgate.proto", "server": "shardgate.server", "shards": "shardgate.shards", "clients": "shardgate.clients"}
CLIENT_COMMAND = "shardgate.clients.cli"
"""`shardgate serve` lives in the one command, so it may load the gateway's flags (lazily)."""


def module_files() -> dict[str, Path]:
    """Every hand-written module of the package, by its installed name."""
    modules = {}
    for directory, package in PACKAGES.items():
        for path in (ROOT / directory).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT / directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (a `from x import y` names x.y when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = module.split(".")
        parent = parent if is_package else parent[:-1]
        parent = parent[: len(parent) - (node.level - 1)]
        base = ".".join(parent + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports(module: str) -> set[str]:
    """Every module `module` imports, wherever the import statement is (in functions and under
    TYPE_CHECKING too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(_targets(node, module, is_package))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(sources: list[str], forbidden: list[str]) -> list[str]:
    return sorted(
        f"{module} imports {target}" for module in sources for target in imports(module) if any(_under(target, f) for f in forbidden)
    )


def in_package(prefix: str) -> list[str]:
    return [m for m in MODULES if _under(m, prefix)]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself),
    each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(cycles)


def module_graph() -> dict[str, set[str]]:
    return {module: {t for t in imports(module) if t in MODULES and t != module} for module in MODULES}


def test_the_scan_sees_every_package_and_nested_imports():
    assert {"shardgate.shards.executor", "shardgate.server.engine", "shardgate.clients.client", "shardgate.proto.common"} <= set(MODULES)
    assert "shardgate.server.replicas.client" in imports("shardgate.clients.tools.in_process")  # imported inside a function


def test_the_shards_import_neither_the_gateway_nor_the_clients():
    assert violations(in_package("shardgate.shards"), ["shardgate.server", "shardgate.clients"]) == []


def test_the_gateway_imports_neither_torch_nor_the_shards():
    assert violations(in_package("shardgate.server"), ["torch", "shardgate.shards"]) == []


def test_the_client_library_imports_neither_torch_nor_the_gateway_nor_the_shards():
    library = [m for m in in_package("shardgate.clients") if not _under(m, "shardgate.clients.tools") and m != CLIENT_COMMAND]
    assert "shardgate.clients.client" in library
    assert violations(library, ["torch", "shardgate.server", "shardgate.shards"]) == []


def test_the_leaf_imports_nothing_of_the_package_but_itself():
    assert violations(in_package("shardgate.proto"), ["torch", "shardgate.server", "shardgate.shards", "shardgate.clients"]) == []


def test_no_import_cycles():
    assert import_cycles(module_graph()) == []


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
