from pathlib import Path

import pytest
import torch

from shardgate.shards import cpu_kernels

COMPILE_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "compile-tests"
"""Shared by the compile tests (git-ignored): a second run reuses the compiled graphs and the kernel."""


@pytest.fixture
def cpu_kernels_loaded(monkeypatch):
    """The C++ decode kernels, loaded for this test only (the flag goes back afterwards, so other
    tests' decodes gather their blocks and keep oneDNN's linears); the paged attention op."""
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    assert cpu_kernels.load(COMPILE_CACHE)
    return torch.ops.shardgate_kernels.paged_decode_attention
