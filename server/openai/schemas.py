"""Request bodies of the OpenAI API as pydantic models, and their translation into the engine's
GenerateRequest / EmbedRequest.

A body field no model declares is refused (400, naming it), as OpenAI's own API does; so is a
declared parameter set to a value shardgate cannot honour (best_of, echo, logit_bias,
penalties, tools, top alternatives in logprobs). The engine API then checks the values as it
does for gRPC (errors.py turns its field names into these parameter names).

Extensions (beyond OpenAI's parameters): top_k, ignore_eos, priority, timeout_ms (as in the
native API), return_token_ids (each choice and chunk carries its token ids, as vLLM's), and for
embeddings pooling ("mean", "last") and normalize (default true: OpenAI's vectors have unit length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardgate.proto import inference_pb2
from shardgate.server.openai.errors import OpenAIError, invalid_param

UINT32 = (1 << 32) - 1
INT32 = (1 << 31) - 1
UINT64 = (1 << 64) - 1
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default max_tokens of /v1/completions (chat's default is what fits in the context)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def refuse_unsupported(self) -> None:
        """Raises a 400 for a parameter set to a value shardgate cannot honour."""


class StreamOptions(_Body):
    include_usage: bool = False


class _Generate(_Body):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=0, le=UINT32)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=INT32)
    """Extension; 0 or -1 (vLLM's spelling) mean off."""
    seed: int | None = Field(None, ge=0, le=UINT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    """Accepted and not used (OpenAI uses it for abuse monitoring)."""
    priority: int = Field(0, ge=-INT32 - 1, le=INT32)
    ignore_eos: bool = False
    timeout_ms: int | None = Field(None, ge=0, le=UINT32)
    return_token_ids: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise invalid_param(name, "is not supported (only 0)")
        if self.logit_bias:
            raise invalid_param("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise invalid_param("stream_options", "is only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generate):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise invalid_param("echo", "is not supported")
        if self.best_of not in (None, self.n):
            raise invalid_param("best_of", "is not supported (only equal to n)")
        if self.suffix:
            raise invalid_param("suffix", "is not supported")
        if self.logprobs:
            raise invalid_param("logprobs", "only 0 is supported: the chosen tokens' log-probabilities, without alternatives")

    def prompts(self) -> list[str | list[int]]:
        """One prompt or several (a batch: each gets n choices)."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class ContentPart(BaseModel):
    """A part of a message's content; other keys are allowed so that a non-text part (an image)
    is refused by its type, naming it, rather than as an unknown argument."""

    type: str
    text: str | None = None


class ChatMessageIn(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.name is not None:
            raise invalid_param(f"messages[{index}].name", "is not supported")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid_param(f"messages[{index}].content", f"only text parts are supported, not {part.type!r}")
        return "".join(part.text for part in self.content)


class ChatRequest(_Generate):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(None, ge=0, le=UINT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs:
            raise invalid_param("top_logprobs", "only 0 is supported: the chosen tokens' log-probabilities, without alternatives")
        if self.response_format not in (None, {"type": "text"}):
            raise invalid_param("response_format", "only {'type': 'text'} is supported")
        if self.tools:
            raise invalid_param("tools", "tool calls are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise invalid_param("tool_choice", "tool calls are not supported")

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None or self.max_tokens is None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> inference_pb2.ChatMessages:
        """The conversation for the chat template; OpenAI's `developer` role is its `system`."""
        return inference_pb2.ChatMessages(
            messages=[
                inference_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text(i))
                for i, m in enumerate(self.messages)
            ]
        )


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    priority: int = Field(0, ge=-INT32 - 1, le=INT32)
    timeout_ms: int | None = Field(None, ge=0, le=UINT32)
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True

    def embed_request(self, hidden_size: int) -> inference_pb2.EmbedRequest:
        if self.dimensions not in (None, hidden_size):
            raise invalid_param("dimensions", f"the model's vectors have {hidden_size} dimensions; others are not supported")
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if any(not isinstance(text, str) for text in inputs):
            raise invalid_param("input", "token-id inputs are not supported; send text")
        return inference_pb2.EmbedRequest(
            inputs=inputs,
            pooling=inference_pb2.POOLING_LAST if self.pooling == "last" else inference_pb2.POOLING_MEAN,
            normalize=self.normalize,
            priority=self.priority,
            timeout_ms=self.timeout_ms or 0,
        )


def parse(model: type[_Body], body: Any) -> Any:
    """The body as `model`, or a 400 naming the first parameter at fault."""
    if not isinstance(body, dict):
        raise invalid_param(None, "the request body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise invalid_param(param, f"unrecognized request argument supplied: {param}") from None
        raise invalid_param(param, first["msg"]) from None
    parsed.refuse_unsupported()
    return parsed


def _param(loc: tuple) -> str | None:
    """A pydantic error location as a parameter path (`messages[0].content`), without the
    union members pydantic names in it (`str`, `list[int]`, class names)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool", "list", "dict"):
            path += f".{part}" if path else part
    return path or None


@dataclass(frozen=True)
class ChoicePlan:
    """The requests of one call: one per choice, in choice order (prompt by prompt, n each)."""

    requests: list[inference_pb2.GenerateRequest]
    prompt_of_choice: list[int]
    renames: dict[str, str]
    """Native field → the parameter this body used for it, for errors (max_new_tokens → max_tokens)."""


def _sampling(body: _Generate, max_new_tokens: int, choice: int) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        max_new_tokens=max_new_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else (body.stop or []),
        ignore_eos=body.ignore_eos,
        priority=body.priority,
        timeout_ms=body.timeout_ms or 0,
    )
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.top_k is not None:
        request.top_k = max(body.top_k, 0)
    if body.seed is not None:  # the choices of one prompt differ: each its own seed
        request.seed = (body.seed + choice) & UINT64
    return request


def _check_choices(count: int, limit: int) -> None:
    if count > limit:
        raise OpenAIError(400, f"n: at most {limit} choices per request (n × prompts), got {count}", "invalid_request_error", "n")


def completion_plan(body: CompletionRequest, max_choices: int) -> ChoicePlan:
    prompts = body.prompts()
    _check_choices(len(prompts) * body.n, max_choices)
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    requests, prompt_of_choice = [], []
    for index, prompt in enumerate(prompts):
        for choice in range(body.n):
            request = _sampling(body, max_tokens, choice)
            if isinstance(prompt, str):
                request.prompt = prompt
            else:
                request.prompt_token_ids.ids[:] = prompt
                if not prompt:  # an empty list is still a token-id prompt: let validation say so
                    request.prompt_token_ids.SetInParent()
            request.logprobs = body.logprobs is not None
            requests.append(request)
            prompt_of_choice.append(index)
    return ChoicePlan(requests, prompt_of_choice, {"max_new_tokens": "max_tokens"})


def chat_plan(body: ChatRequest, max_choices: int, max_tokens: int) -> ChoicePlan:
    """`max_tokens`: the body's, or what fits when it gives none."""
    _check_choices(body.n, max_choices)
    messages = body.chat_messages()
    requests = []
    for choice in range(body.n):
        request = _sampling(body, max_tokens, choice)
        request.messages.CopyFrom(messages)
        request.messages.SetInParent()  # an empty conversation is still one: let validation say so
        request.logprobs = body.logprobs
        requests.append(request)
    return ChoicePlan(requests, [0] * body.n, {"max_new_tokens": body.max_tokens_param})
