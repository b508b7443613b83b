"""What a checkpoint says about serving it, beyond the architecture: its chat template, the text
of its bos and eos tokens, and its sampling defaults.

Read from a Hugging Face folder (``tokenizer_config.json``, ``chat_template.jinja``,
``generation_config.json``) or a GGUF file's metadata (``tokenizer.chat_template``, the token
list, ``general.sampling.*``). Every field is None where the checkpoint does not say. The
end-of-sequence ids are ModelConfig.eos_token_ids. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServingDefaults:
    chat_template: str | None = None
    """A jinja2 template rendering a list of messages into a prompt, as transformers runs it."""
    bos_token: str | None = None
    eos_token: str | None = None
    temperature: float | None = None
    """0.0 where the checkpoint asks for greedy decoding (``do_sample: false``)."""
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_hf_folder(cls, folder: Path) -> ServingDefaults:
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        template = _pick_template(tokenizer_config.get("chat_template"))
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        temperature = generation.get("temperature")
        if generation.get("do_sample") is False:
            temperature = 0.0  # transformers decodes greedily then, whatever the temperature says
        return cls(
            chat_template=template,
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
            temperature=None if temperature is None else float(temperature),
            top_p=_optional(float, generation.get("top_p")),
            top_k=_optional(int, generation.get("top_k")),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> ServingDefaults:
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        return cls(
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=token("bos"),
            eos_token=token("eos"),
            temperature=_optional(float, metadata.get("general.sampling.temp")),
            top_p=_optional(float, metadata.get("general.sampling.top_p")),
            top_k=_optional(int, metadata.get("general.sampling.top_k")),
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pick_template(value: str | list[dict[str, str]] | None) -> str | None:
    """A ``chat_template`` entry: one template, or a list of named ones (then the "default")."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value}
        return named.get("default")
    return value


def _token_text(value: str | dict[str, Any] | None) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)
