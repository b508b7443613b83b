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
