"""The client side stays light: the library needs neither torch nor the server, and the client
commands load transformers, torch and matplotlib only on the paths that use them."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "tokenizers")


def modules_after(code: str) -> set[str]:
    """The modules loaded once `code` ran in a fresh interpreter."""
    script = f"import sys, contextlib, io\n{code}\nprint(' '.join(sorted(sys.modules)), file=sys.stderr)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(result.stderr.split())


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


def test_the_library_imports_nothing_heavy_and_not_the_server():
    modules = modules_after("import shardgate.clients")
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
