"""The package installs under the shardgate namespace and keeps its import boundaries."""

import subprocess
import sys
import zipfile

import pytest


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_gateway_does_not_import_torch():
    modules = imported_after("import shardgate.server.app, shardgate.server.cli")
    assert "shardgate.server.engine" in modules and "torch" not in modules


def test_client_imports_neither_torch_nor_the_server():
    modules = imported_after("import shardgate.clients.client")
    assert "torch" not in modules and not any(m.startswith("shardgate.server") for m in modules)
    assert "tokenizers" not in modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), root], check=True)
    [path] = out.glob("shardgate-*.whl")
    return path


def test_wheel_installs_only_under_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"shardgate"}
    for module in ("proto/inference_pb2.py", "proto/inference.proto", "server/scheduler.py", "shards/llama.py", "clients/client.py"):
        assert f"shardgate/{module}" in names
    assert not any(n.startswith("shardgate/tests") for n in names)


def test_wheel_imports_on_its_own(wheel, tmp_path):
    # The unpacked wheel alone, without site-packages (so not the editable install).
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = "import shardgate.server.config as c, shardgate.server.block_manager as b; print(c.__file__)"
    result = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "shardgate" / "server"))
