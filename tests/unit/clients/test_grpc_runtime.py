"""The `shardgate` command's gRPC settings: set before grpc loads, never over the user's own, and
never by the client library."""

import os
import subprocess
import sys

import pytest

from shardgate.clients import grpc_runtime


def run(code: str, **environ: str) -> str:
    """What `code` prints in a fresh interpreter whose environment has no gRPC settings but these."""
    env = {k: v for k, v in os.environ.items() if k not in grpc_runtime.SETTINGS} | environ
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip()


def test_the_command_configures_grpc_before_loading_it():
    out = run(
        "import os, sys\nimport shardgate.clients.cli\nfrom shardgate.clients import grpc_runtime\n"
        "print(grpc_runtime.APPLIED, 'grpc' in sys.modules, os.environ['GRPC_EXPERIMENTS'])"
    )
    assert out == "True True -event_engine_client"


def test_the_users_own_setting_stays():
    code = "import os\nimport shardgate.clients.cli\nprint(os.environ['GRPC_EXPERIMENTS'])"
    assert run(code, GRPC_EXPERIMENTS="-event_engine_listener") == "-event_engine_listener"


def test_the_library_loads_no_grpc_and_sets_nothing_until_used():
    out = run(
        "import os, sys\nimport shardgate.clients\nprint('grpc' in sys.modules, 'GRPC_EXPERIMENTS' in os.environ)\n"
        "shardgate.clients.Client\nprint('grpc' in sys.modules, 'GRPC_EXPERIMENTS' in os.environ)"
    )
    assert out.split() == ["False", "False", "True", "False"]


def test_configure_sets_only_what_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "grpc", raising=False)
    environ = {"OTHER": "1"}
    assert grpc_runtime.configure(environ)
    assert environ == {"OTHER": "1", **grpc_runtime.SETTINGS}
    environ = {"GRPC_EXPERIMENTS": "x"}
    assert grpc_runtime.configure(environ) and environ == {"GRPC_EXPERIMENTS": "x"}


def test_configure_does_nothing_once_grpc_has_loaded():
    pytest.importorskip("grpc")
    environ: dict[str, str] = {}
    assert not grpc_runtime.configure(environ) and environ == {}


def test_a_missing_name_is_an_attribute_error():
    import shardgate.clients

    with pytest.raises(AttributeError, match="NoSuchThing"):
        shardgate.clients.NoSuchThing  # noqa: B018
    assert set(shardgate.clients.__all__) <= set(dir(shardgate.clients))
