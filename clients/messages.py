"""Builds the API's request messages from plain Python arguments."""

from __future__ import annotations

from shardgate.proto import inference_pb2

POOLINGS = {"mean": inference_pb2.POOLING_MEAN, "last": inference_pb2.POOLING_LAST}


def build_request(
    prompt: str | list[int],
    *,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
    priority: int = 0,
    timeout_ms: int = 0,
    request_id: str = "",
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; a prompt given as a list of ints is sent as token ids."""
    message = inference_pb2.GenerateRequest(
        request_id=request_id,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        stop=stop or [],
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        priority=priority,
        timeout_ms=timeout_ms,
    )
    if isinstance(prompt, str):
        message.prompt = prompt
    else:
        message.prompt_token_ids.ids.extend(prompt)
    if temperature is not None:
        message.temperature = temperature
    if top_p is not None:
        message.top_p = top_p
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


def bidi_generate(request_id: str, prompt: str | list[int], **params) -> inference_pb2.GenerateBidiRequest:
    """Starts a generation on a bidi stream; request_id must be unique among the stream's live requests."""
    if not request_id:
        raise ValueError("a generation on a bidi stream needs a request_id")
    return inference_pb2.GenerateBidiRequest(generate=build_request(prompt, request_id=request_id, **params))


def bidi_cancel(request_id: str) -> inference_pb2.GenerateBidiRequest:
    return inference_pb2.GenerateBidiRequest(cancel=inference_pb2.CancelGeneration(request_id=request_id))
