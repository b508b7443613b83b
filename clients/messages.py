"""Builds the API's request messages from plain Python arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shardgate.proto import inference_pb2

POOLINGS = {"mean": inference_pb2.POOLING_MEAN, "last": inference_pb2.POOLING_LAST}

Message = Mapping[str, str] | tuple[str, str]
"""One turn of a conversation: {"role": ..., "content": ...} or (role, content)."""


def chat_messages(messages: Sequence[Message]) -> inference_pb2.ChatMessages:
    """The ChatMessages of a non-empty list of messages, each a {"role", "content"} mapping or a
    (role, content) pair of strings; ValueError otherwise. (The server checks the roles.)"""
    if isinstance(messages, (str, bytes, Mapping)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts or (role, content) pairs")
    out = inference_pb2.ChatMessages()
    for i, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif isinstance(message, tuple) and len(message) == 2:
            role, content = message
        else:
            raise ValueError(f"messages[{i}] must be a {{'role': ..., 'content': ...}} dict or a (role, content) pair, not {message!r}")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs a non-empty string role and a string content, got {message!r}")
        out.messages.add(role=role, content=content)
    return out


def build_request(
    prompt: str | list[int] | None = None,
    *,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    priority: int = 0,
    timeout_ms: int = 0,
    request_id: str = "",
    cache_salt: str = "",
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest of a prompt or of chat messages (exactly one of them): a prompt given as
    a list of ints is sent as token ids; messages (see chat_messages) are rendered by the
    server with the model's chat template. Sampling parameters left None get the model's
    defaults on the server. Only requests with the same `cache_salt` share cached prompt blocks."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    message = inference_pb2.GenerateRequest(
        request_id=request_id,
        max_new_tokens=max_new_tokens,
        stop=stop or [],
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        priority=priority,
        timeout_ms=timeout_ms,
        cache_salt=cache_salt,
    )
    if messages is not None:
        message.messages.CopyFrom(chat_messages(messages))
    elif isinstance(prompt, str):
        message.prompt = prompt
    else:
        message.prompt_token_ids.ids.extend(prompt)
    if temperature is not None:
        message.temperature = temperature
    if top_p is not None:
        message.top_p = top_p
    if top_k is not None:
        message.top_k = top_k
    if seed is not None:
        message.seed = seed
    return message


def build_embed_request(
    inputs: str | list[str],
    *,
    pooling: str = "mean",
    normalize: bool = False,
    priority: int = 0,
    timeout_ms: int = 0,
    request_id: str = "",
) -> inference_pb2.EmbedRequest:
    """An EmbedRequest; a single string is one input. pooling is "mean" or "last"."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    return inference_pb2.EmbedRequest(
        request_id=request_id,
        inputs=[inputs] if isinstance(inputs, str) else list(inputs),
        pooling=POOLINGS[pooling],
        normalize=normalize,
        priority=priority,
        timeout_ms=timeout_ms,
    )


def build_tokenize_request(text: str | Sequence[Message], add_special_tokens: bool = False) -> inference_pb2.TokenizeRequest:
    """A TokenizeRequest of a text, or of chat messages (rendered as a chat request's are)."""
    if isinstance(text, str):
        return inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
    return inference_pb2.TokenizeRequest(messages=chat_messages(text), add_special_tokens=add_special_tokens)


def bidi_generate(request_id: str, prompt: str | list[int], **params) -> inference_pb2.GenerateBidiRequest:
    """Starts a generation on a bidi stream; request_id must be unique among the stream's live requests."""
    if not request_id:
        raise ValueError("a generation on a bidi stream needs a request_id")
    return inference_pb2.GenerateBidiRequest(generate=build_request(prompt, request_id=request_id, **params))


def bidi_cancel(request_id: str) -> inference_pb2.GenerateBidiRequest:
    return inference_pb2.GenerateBidiRequest(cancel=inference_pb2.CancelGeneration(request_id=request_id))
