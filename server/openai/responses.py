"""OpenAI response objects and stream chunks (plain dicts, serialized once), and the per-choice
accumulation of the engine API's outputs."""

from __future__ import annotations

import array
import base64
import json
import secrets
import sys
import time
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from shardgate.server.engine_api import GenerateOutput, Usage
from shardgate.server.openai.errors import OpenAIError
from shardgate.server.request import FinishReason

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.CANCELLED: "abort",  # vLLM's word: the server ended it (a drain out of time)
    FinishReason.ERROR: "error",
}


def dumps(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class Choice:
    """What one choice has produced so far (for a whole response; a stream sends each output)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None

    def add(self, output: GenerateOutput) -> None:
        self.text.append(output.text)
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs
        if output.finish_reason is not None:
            self.finish_reason = FINISH_REASONS[output.finish_reason]
            self.usage = output.usage


def usage(choices: list[Choice], prompt_of_choice: list[int]) -> dict:
    """Token counts of a call: each prompt once (its first choice's count; the other choices
    share its KV through the prefix cache), every choice's completion."""
    first = {}
    for choice, prompt in zip(choices, prompt_of_choice):
        first.setdefault(prompt, choice.usage)
    prompt_tokens = sum(u.prompt_tokens for u in first.values())
    completion_tokens = sum(c.usage.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in first.values())},
        # An extension: times the choices' generations moved to another replica and continued there.
        "resumes": sum(c.usage.resumes for c in choices),
    }


class Writer:
    """Writes the objects of one call: its id, creation time and model, and whether choices
    carry logprobs and token ids."""

    def __init__(self, kind: str, model: str, tokenizer: Tokenizer, logprobs: bool, token_ids: bool) -> None:
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._token_ids = token_ids
        self._object = "chat.completion" if self.chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self._spoke: set[int] = set()
        """Choices whose role a chat stream has sent (in their first delta)."""

    def _logprobs_of(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if not self._logprobs:
            return None
        tokens = [self._tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        if self.chat:
            return {
                "content": [{"token": t, "logprob": p, "bytes": list(t.encode()), "top_logprobs": []} for t, p in zip(tokens, logprobs)]
            }
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}

    def _choice(self, index: int, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str | None, delta: bool) -> dict:
        if not self.chat:
            body = {"index": index, "text": text}
        elif delta:
            if index not in self._spoke:
                self._spoke.add(index)
                body = {"index": index, "delta": {"role": "assistant", "content": text}}
            else:
                body = {"index": index, "delta": {"content": text} if text else {}}
        else:
            body = {"index": index, "message": {"role": "assistant", "content": text}}
        body["logprobs"] = self._logprobs_of(token_ids, logprobs)
        body["finish_reason"] = finish_reason
        if self._token_ids:
            body["token_ids"] = token_ids
        return body

    def response(self, choices: list[Choice], prompt_of_choice: list[int]) -> dict:
        return {
            "id": self.id,
            "object": self._object,
            "created": self.created,
            "model": self.model,
            "choices": [
                self._choice(i, "".join(c.text), c.token_ids, c.logprobs, c.finish_reason, delta=False) for i, c in enumerate(choices)
            ],
            "usage": usage(choices, prompt_of_choice),
        }

    def chunk(self, index: int, output: GenerateOutput, include_usage: bool) -> str:
        """The stream chunk of one output of choice `index`: its new text; the last one also
        its finish reason. With include_usage every chunk has `usage: null` (OpenAI's shape)."""
        finish = None if output.finish_reason is None else FINISH_REASONS[output.finish_reason]
        chunk = {
            "id": self.id,
            "object": self._chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(index, output.text, output.token_ids, output.logprobs, finish, delta=True)],
        }
        if include_usage:
            chunk["usage"] = None
        return dumps(chunk)

    def usage_chunk(self, choices: list[Choice], prompt_of_choice: list[int]) -> str:
        return dumps(
            {
                "id": self.id,
                "object": self._chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(choices, prompt_of_choice),
            }
        )


def error_event(error: OpenAIError) -> str:
    """The event that ends a stream that fails after it started (its HTTP status was sent)."""
    return dumps(error.body())


def models(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model, created)]}


def model_object(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "shardgate"}


def embeddings(model: str, vectors: list[bytes], prompt_tokens: int, encoding_format: str) -> dict:
    """`vectors`: little-endian float32 bytes each, sent as they are (base64) or as numbers."""

    def encode(data: bytes):
        if encoding_format == "base64":
            return base64.b64encode(data).decode()
        values = array.array("f")
        values.frombytes(data)
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
