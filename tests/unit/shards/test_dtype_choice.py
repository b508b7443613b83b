import json

import pytest
import torch

from shardgate.shards import dtype_choice
from shardgate.shards.dtype_choice import choose_dtype

CPU = torch.device("cpu")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Sets the CPU feature flags dtype_choice sees."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(dtype_choice, "_cpu_flags", lambda: set(flags))

    return set_flags


def folder_with(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_an_explicit_dtype_is_kept(cpu_flags):
    cpu_flags()
    assert choose_dtype("bfloat16", "builtin:tiny", CPU).name == "bfloat16"
    assert choose_dtype("float16", "/m/model.gguf", CPU).reason == "--dtype"


def test_auto_gives_builtin_tiny_float32(cpu_flags):
    cpu_flags("avx512_bf16")
    assert choose_dtype("auto", "builtin:tiny", CPU).name == "float32"


@pytest.mark.parametrize(("flags", "expected"), [(("avx512_bf16",), "bfloat16"), (("amx_bf16",), "bfloat16"), (("avx2",), "float32")])
def test_auto_gives_a_gguf_bfloat16_where_the_cpu_has_it(cpu_flags, flags, expected):
    cpu_flags(*flags)
    choice = choose_dtype("auto", "/m/model.gguf", CPU)
    assert choice.name == expected and choice.torch_dtype == getattr(torch, expected)
    assert "GGUF weights are quantized" in choice.reason


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [
        ({"torch_dtype": "bfloat16"}, ("avx512_bf16",), "bfloat16"),
        ({"dtype": "bfloat16"}, ("avx2",), "float32"),
        ({"torch_dtype": "float16"}, ("avx512_bf16",), "float32"),
        ({"torch_dtype": "float16"}, ("avx512_fp16",), "float16"),
        ({"torch_dtype": "float32"}, ("avx512_bf16",), "float32"),
        ({}, ("avx512_bf16",), "float32"),
    ],
)
def test_auto_follows_a_hf_checkpoint_where_the_cpu_computes_it(tmp_path, cpu_flags, config, flags, expected):
    cpu_flags(*flags)
    choice = choose_dtype("auto", folder_with(tmp_path, **config), CPU)
    assert choice.name == expected and choice.reason.startswith("auto: ")


def test_auto_on_cuda_asks_torch_about_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    cuda = torch.device("cuda", 0)
    assert choose_dtype("auto", folder_with(tmp_path, torch_dtype="bfloat16"), cuda).name == "float32"
    assert choose_dtype("auto", folder_with(tmp_path, torch_dtype="float16"), cuda).name == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype("auto", "/m/model.gguf", cuda).name == "bfloat16"
