"""OpenAI request bodies → GenerateRequests, and the engine API's refusals → OpenAI errors
(no server: pure translation)."""

import grpc
import pytest

from shardgate.server.openai import schemas
from shardgate.server.openai.errors import OpenAIError, from_request_error
from shardgate.server.validation import RequestError, invalid


def completion(**body) -> schemas.CompletionRequest:
    return schemas.parse(schemas.CompletionRequest, {"model": "m", "prompt": "hi", **body})


def test_a_completion_becomes_one_request_per_choice_with_its_own_seed():
    plan = schemas.completion_plan(completion(prompt=["a", "b"], n=2, seed=7, max_tokens=5, stop="x", top_k=-1), max_choices=4)
    assert [r.prompt for r in plan.requests] == ["a", "a", "b", "b"] and plan.prompt_of_choice == [0, 0, 1, 1]
    assert [r.seed for r in plan.requests] == [7, 8, 7, 8]
    assert all(r.max_new_tokens == 5 and list(r.stop) == ["x"] and r.top_k == 0 for r in plan.requests)
    assert not plan.requests[0].HasField("temperature")  # unset: the model's default
    ids = schemas.completion_plan(completion(prompt=[1, 2, 3]), 4).requests[0]
    assert list(ids.prompt_token_ids.ids) == [1, 2, 3] and ids.max_new_tokens == schemas.COMPLETION_DEFAULT_MAX_TOKENS


def test_chat_messages_keep_their_text_and_developer_is_system():
    body = schemas.parse(
        schemas.ChatRequest,
        {
            "model": "m",
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },
    )
    [request] = schemas.chat_plan(body, 4, max_tokens=9).requests
    assert [(m.role, m.content) for m in request.messages.messages] == [("system", "be brief"), ("user", "hi")]
    assert request.max_new_tokens == 9


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"unknown": 1}, "unknown"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": -1}, "seed"),
    ],
)
def test_refusals_name_the_parameter(body, param):
    with pytest.raises(OpenAIError) as raised:
        completion(**body)
    assert raised.value.status == 400 and raised.value.param == param and raised.value.message.startswith(param)


def test_too_many_choices_are_refused_naming_n():
    with pytest.raises(OpenAIError) as raised:
        schemas.completion_plan(completion(prompt=["a", "b", "c"], n=2), max_choices=4)
    assert raised.value.param == "n"


def test_engine_fields_become_openai_params():
    error = from_request_error(invalid("max_new_tokens", "must be in [1, 8], got 9"), {"max_new_tokens": "max_completion_tokens"})
    assert (error.status, error.param, error.message) == (400, "max_completion_tokens", "max_completion_tokens: must be in [1, 8], got 9")
    context = from_request_error(invalid("max_new_tokens", "prompt (9 tokens) + max_new_tokens (8) exceeds the model context"))
    assert context.message == "max_tokens: prompt (9 tokens) + max_tokens (8) exceeds the model context"
    stop = from_request_error(invalid("stop[1]", "must be 1 to 4 characters"))
    assert (stop.param, stop.message) == ("stop", "stop[1]: must be 1 to 4 characters")
    assert from_request_error(invalid("prompt_token_ids", "bad")).param == "prompt"
    assert from_request_error(invalid("inputs[2]", "too long")).message == "input[2]: too long"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_statuses_map_to_http(code, status):
    error = from_request_error(RequestError(code, "max_queue_requests", "the queue is full"))
    assert error.status == status and error.param is None and "max_queue_requests" in error.message
    assert ("Retry-After" in error.headers()) == (status == 429)
