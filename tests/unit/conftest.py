import pytest
import torch

from shardgate.shards import cpu_kernels
from shardgate.shards.compiled_step import default_cache_dir


@pytest.fixture
def cpu_kernels_loaded(monkeypatch):
    """The C++ decode kernels, loaded for this test only (the flag goes back afterwards, so other
    tests' decodes gather their blocks and keep oneDNN's linears); the paged attention op."""
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    assert cpu_kernels.load(default_cache_dir())
    return torch.ops.shardgate_kernels.paged_decode_attention
