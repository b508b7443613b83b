"""Checks a GenerateRequest against the model's limits and turns it into a Request.

Every failure names the offending field, so the caller's INVALID_ARGUMENT says what to fix.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import grpc
from tokenizers import Encoding, Tokenizer

from shardgate.proto import inference_pb2
from shardgate.server.chat_template import ROLES, ChatTemplate, ChatTemplateError
from shardgate.server.config import GatewayConfig
from shardgate.server.embed_batcher import Pooling
from shardgate.server.priority import PRIORITY_LIMIT
from shardgate.server.request import SamplingParams

MAX_REQUEST_ID_CHARS = 256


class RequestError(Exception):
    """A request the server refuses or cannot finish; carries the gRPC status code to answer
    with. Its message starts with the field (or bound) at fault, when one is; `retry_delay_s`
    is how long a client should wait before sending it again, when that may help (None: the
    frontend's default for the code)."""

    def __init__(self, code: grpc.StatusCode, field: str | None, message: str, retry_delay_s: float | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.retry_delay_s = retry_delay_s


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context_tokens: int
    """min(the model's positions, one replica's KV capacity)."""
    max_embed_tokens: int
    """Longest Embed input: min(max_context_tokens, the step token budget)."""
    max_chars_per_token: int | None = None
    """Most input characters one token can stand for (input_size.py); None: no such bound."""

    def check_length(self, field: str, text: str, max_tokens: int) -> None:
        """Refuses, without tokenizing it, a text that must make more than max_tokens tokens."""
        if self.max_chars_per_token is not None and len(text) > self.max_chars_per_token * max_tokens:
            raise invalid(
                field,
                f"{len(text)} characters make more than {max_tokens} tokens, the most it may have "
                f"(one token of this model covers at most {self.max_chars_per_token} characters)",
            )


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling parameters it leaves unset: the model's defaults
    where its checkpoint states them, else the API's (sample from the whole distribution)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def of_model(cls, info: inference_pb2.ModelInfoResponse) -> SamplingDefaults:
        return cls(
            temperature=info.default_temperature if info.HasField("default_temperature") else cls.temperature,
            top_p=info.default_top_p if info.HasField("default_top_p") else cls.top_p,
            top_k=info.default_top_k if info.HasField("default_top_k") else cls.top_k,
        )


API_DEFAULTS = SamplingDefaults()
"""The API's own defaults, for a model whose checkpoint states none."""


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    priority: int = 0
    timeout_s: float | None = None
    """The request's own deadline (timeout_ms), in seconds from arrival."""


@dataclass(frozen=True)
class ValidEmbed:
    request_id: str
    inputs: list[list[int]]
    """Token ids of each input (with the model's special tokens, as a prompt gets them)."""
    pooling: Pooling
    normalize: bool
    priority: int
    timeout_s: float | None


_POOLINGS = {inference_pb2.POOLING_MEAN: Pooling.MEAN, inference_pb2.POOLING_LAST: Pooling.LAST}


def _request_id(message) -> str:
    if len(message.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    return message.request_id or secrets.token_hex(8)


def _priority(message) -> int:
    if not -PRIORITY_LIMIT <= message.priority <= PRIORITY_LIMIT:
        raise invalid("priority", f"must be in [{-PRIORITY_LIMIT}, {PRIORITY_LIMIT}], got {message.priority}")
    return message.priority


def _timeout_s(message) -> float | None:
    return message.timeout_ms / 1000 if message.timeout_ms else None


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> Encoding:
    """tokenizer.encode(text), through encode_batch: it releases the GIL while it works, so the
    event loop runs on while a tokenizer thread encodes (encode holds the GIL throughout)."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


def check_embed_sizes(message: inference_pb2.EmbedRequest, limits: ModelLimits, config: GatewayConfig) -> None:
    """The checks of an Embed call that cost nothing per character: run before it is tokenized."""
    _request_id(message)
    if not message.inputs:
        raise invalid("inputs", "must not be empty")
    if len(message.inputs) > config.embed.max_inputs:
        raise invalid("inputs", f"at most {config.embed.max_inputs} inputs per call, got {len(message.inputs)}")
    for i, text in enumerate(message.inputs):
        if not text:
            raise invalid(f"inputs[{i}]", "must not be empty")
        limits.check_length(f"inputs[{i}]", text, limits.max_embed_tokens)


def validate_embed(message: inference_pb2.EmbedRequest, tokenizer: Tokenizer, limits: ModelLimits, config: GatewayConfig) -> ValidEmbed:
    """The call the batcher runs; tokenizes its inputs (run it off the event loop, after
    check_embed_sizes)."""
    check_embed_sizes(message, limits, config)
    request_id = _request_id(message)
    if message.pooling not in _POOLINGS:
        raise invalid("pooling", f"unknown pooling {message.pooling}")
    priority = _priority(message)
    inputs = [encoding.ids for encoding in tokenizer.encode_batch(list(message.inputs), add_special_tokens=True)]
    for i, ids in enumerate(inputs):
        if len(ids) > limits.max_embed_tokens:
            raise invalid(f"inputs[{i}]", f"{len(ids)} tokens exceed the longest input ({limits.max_embed_tokens} tokens)")
    return ValidEmbed(request_id, inputs, _POOLINGS[message.pooling], message.normalize, priority, _timeout_s(message))


def render_chat(messages: inference_pb2.ChatMessages, template: ChatTemplate | None) -> str:
    """The prompt the model's chat template makes of `messages` (ending with the start of the
    assistant's turn); every refusal names `messages`."""
    if template is None:
        raise invalid("messages", "the model has no chat template; send a prompt instead")
    if not messages.messages:
        raise invalid("messages", "must not be empty")
    for i, message in enumerate(messages.messages):
        if not message.role:
            raise invalid(f"messages[{i}].role", f"must be set (one of {', '.join(ROLES)})")
        if message.role not in ROLES:
            raise invalid(f"messages[{i}].role", f"unknown role {message.role!r}; expected one of {', '.join(ROLES)}")
    try:
        text = template.render([{"role": m.role, "content": m.content} for m in messages.messages])
    except ChatTemplateError as error:
        raise invalid("messages", str(error)) from None
    if not text:
        raise invalid("messages", "the chat template made an empty prompt of them")
    return text


def tokenize_chat(
    messages: inference_pb2.ChatMessages, template: ChatTemplate | None, tokenizer: Tokenizer, limits: ModelLimits, max_tokens: int | None
) -> tuple[str, Encoding]:
    """The rendered prompt and its encoding: tokenized without adding special tokens, since
    the template writes the ones the model expects (as transformers' apply_chat_template). A
    prompt that must make more than max_tokens tokens is refused before it is tokenized."""
    text = render_chat(messages, template)
    if max_tokens is not None:
        limits.check_length("messages", text, max_tokens)
    return text, encode(tokenizer, text, add_special_tokens=False)


def check_sizes(message: inference_pb2.GenerateRequest, limits: ModelLimits) -> None:
    """The checks of a generation request that cost nothing per character or token: run before
    it is tokenized (a prompt the context could never hold is refused by its length alone)."""
    _request_id(message)
    kind = message.WhichOneof("input")
    if kind == "prompt_token_ids" and len(message.prompt_token_ids.ids) > limits.max_context_tokens:
        raise invalid(
            "prompt_token_ids", f"{len(message.prompt_token_ids.ids)} tokens exceed the model context ({limits.max_context_tokens} tokens)"
        )
    if kind == "prompt":
        limits.check_length("prompt", message.prompt, limits.max_context_tokens)


def _prompt_ids(
    message: inference_pb2.GenerateRequest, tokenizer: Tokenizer, limits: ModelLimits, template: ChatTemplate | None
) -> list[int]:
    check_sizes(message, limits)
    kind = message.WhichOneof("input")
    if kind == "prompt_token_ids":
        prompt_ids = list(message.prompt_token_ids.ids)
        if not prompt_ids:
            raise invalid("prompt_token_ids", "must not be empty")
        bad = next((t for t in prompt_ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise invalid("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
        return prompt_ids
    if kind == "messages":
        return tokenize_chat(message.messages, template, tokenizer, limits, limits.max_context_tokens)[1].ids
    if not message.prompt:
        raise invalid("prompt", "must not be empty")
    return encode(tokenizer, message.prompt, add_special_tokens=True).ids


def validate(
    message: inference_pb2.GenerateRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    config: GatewayConfig,
    template: ChatTemplate | None = None,
    defaults: SamplingDefaults = API_DEFAULTS,
) -> ValidRequest:
    """The request the engine runs; `template` renders messages (None: the model has none) and
    `defaults` fill the sampling parameters the request leaves unset. It tokenizes the prompt:
    run it off the event loop, after check_sizes."""
    request_id = _request_id(message)
    prompt_ids = _prompt_ids(message, tokenizer, limits, template)

    limit = config.max_new_tokens_limit
    if not 1 <= message.max_new_tokens <= limit:
        raise invalid("max_new_tokens", f"must be in [1, {limit}], got {message.max_new_tokens}")
    if len(prompt_ids) + message.max_new_tokens > limits.max_context_tokens:
        raise invalid(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({message.max_new_tokens}) "
            f"exceeds the model context ({limits.max_context_tokens} tokens)",
        )

    temperature = message.temperature if message.HasField("temperature") else defaults.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid("temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = message.top_p if message.HasField("top_p") else defaults.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid("top_p", f"must be in (0, 1], got {top_p}")
    top_k = message.top_k if message.HasField("top_k") else defaults.top_k
    if top_k < 0:
        raise invalid("top_k", f"must be >= 0, got {top_k}")

    stop = list(message.stop)
    if len(stop) > config.max_stop_strings:
        raise invalid("stop", f"at most {config.max_stop_strings} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s or len(s) > config.max_stop_string_chars:
            raise invalid(f"stop[{i}]", f"must be 1 to {config.max_stop_string_chars} characters")
    priority = _priority(message)

    seed = message.seed if message.HasField("seed") else secrets.randbits(63)
    params = SamplingParams(
        max_new_tokens=message.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs,
    )
    return ValidRequest(request_id, prompt_ids, params, stop, priority, _timeout_s(message))
