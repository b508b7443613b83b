"""The client side stays light: the library needs neither torch nor the server, and the client
commands load transformers, torch and matplotlib only on the paths that use them; no client
module imports itself back through others."""

import ast
import subprocess
import sys
from pathlib import Path

import shardgate.clients

HEAVY = ("torch", "transformers", "matplotlib", "tokenizers")


def modules_after(code: str) -> set[str]:
    """The modules loaded once `code` ran in a fresh interpreter."""
    script = f"import sys, contextlib, io\n{code}\nprint(' '.join(sorted(sys.modules)), file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stderr.split())


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


def test_the_library_imports_nothing_heavy_and_not_the_server():
    modules = modules_after("import shardgate.clients\nshardgate.clients.AsyncClient, shardgate.clients.Client")
    assert "shardgate.clients.async_client" in modules and "grpc_health.v1.health_pb2" in modules
    assert not heavy(modules) and not any(m.startswith("shardgate.server") for m in modules)


def test_the_command_builds_every_parser_without_heavy_imports():
    code = (
        "import shardgate.clients.tools.batch, shardgate.clients.tools.bench_model, shardgate.clients.tools.load\n"
        "from shardgate.clients.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['tune', '--help'])"
    )
    modules = modules_after(code)
    assert "shardgate.clients.tools.tune" in modules and "shardgate.clients.tools.bench" in modules
    assert not heavy(modules)


def imports_of(path: Path, package: str) -> set[str]:
    """The modules of `package` that the file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
    return {name for name in found if name == package or name.startswith(package + ".")}


def test_no_import_cycles_among_the_client_modules():
    root = Path(shardgate.clients.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("shardgate.clients", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("shardgate.clients", *parts))
        modules[name] = path
    graph = {name: imports_of(path, "shardgate.clients") & set(modules) - {name} for name, path in modules.items()}
    assert graph["shardgate.clients.cli"] >= {"shardgate.clients.tools.bench", "shardgate.clients.tools.arguments"}
    cycles, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other) :] + [other])
            elif other not in state:
                visit(other, [*stack, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
