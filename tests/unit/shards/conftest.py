from pathlib import Path

import pytest
import torch

from shardgate.shards import paged_kernel

COMPILE_CACHE = Path(__file__).resolve().parents[3] / ".cache" / "compile-tests"
"""Shared by the compile tests (git-ignored): a second run reuses the compiled graphs and the kernel."""


@pytest.fixture
def paged_kernel_loaded(monkeypatch):
    """The C++ paged decode kernel, loaded for this test only (the flag goes back afterwards, so
    other tests' decodes gather their blocks as before); its attention op."""
    monkeypatch.setattr(paged_kernel, "_loaded", False)
    assert paged_kernel.load(COMPILE_CACHE)
    return torch.ops.shardgate_kernels.paged_decode_attention
