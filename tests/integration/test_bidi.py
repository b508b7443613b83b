"""GenerateBidi: many requests multiplexed on one stream, each ending on its own."""

import queue
from collections import defaultdict

import grpc

from shardgate.clients import build_request
from shardgate.proto import inference_pb2

GREEDY = dict(temperature=0, ignore_eos=True)


def generate(request_id: str, prompt: str, **params) -> inference_pb2.GenerateBidiRequest:
    return inference_pb2.GenerateBidiRequest(generate=build_request(prompt, request_id=request_id, **params))


def cancel(request_id: str) -> inference_pb2.GenerateBidiRequest:
    return inference_pb2.GenerateBidiRequest(cancel=inference_pb2.CancelGeneration(request_id=request_id))


class Outbox:
    """A request stream the test writes to while it reads the responses."""

    _END = object()

    def __init__(self, *messages):
        self._queue = queue.Queue()
        for message in messages:
            self.send(message)

    def send(self, message) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self):
        while (message := self._queue.get()) is not self._END:
            yield message


def test_eight_interleaved_requests_each_get_their_own_complete_output(client, stub):
    prompts = {f"r{i}": f"bidi prompt {i} " + "q" * (5 * i) for i in range(8)}
    lengths = {request_id: 10 + 3 * i for i, request_id in enumerate(prompts)}
    expected = {rid: client.generate(p, max_new_tokens=lengths[rid], **GREEDY) for rid, p in prompts.items()}

    requests = [generate(rid, p, max_new_tokens=lengths[rid], **GREEDY) for rid, p in prompts.items()]
    order, tokens, text, last, finished_at = [], defaultdict(list), defaultdict(str), {}, []
    for response in stub.GenerateBidi(iter(requests), timeout=120):
        message = response.message
        assert response.WhichOneof("event") == "message" and message.request_id not in last
        order.append(message.request_id)
        tokens[message.request_id] += message.token_ids
        text[message.request_id] += message.text
        if message.finish_reason:
            last[message.request_id] = message
            finished_at.append(len(order) - 1)
    for rid, completion in expected.items():
        assert tokens[rid] == completion.token_ids and text[rid] == completion.text
        assert last[rid].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert last[rid].usage.completion_tokens == lengths[rid]
    # Multiplexed, not one after another: another request streamed before the first ended. (How many of the
    # eight are admitted by then depends on this host's load: CI once saw 6 before the 10-token one ended.)
    assert len(set(order[: finished_at[0] + 1])) >= 2
    assert sum(a != b for a, b in zip(order, order[1:])) > len(prompts)  # more switches than one block a request


def test_cancel_and_deadline_end_only_their_request(client, stub):
    outbox = Outbox(
        generate("keep", "kept request", max_new_tokens=60, **GREEDY),
        generate("drop", "cancelled request", max_new_tokens=1000, **GREEDY),
        generate("late", "timed out request", max_new_tokens=1500, timeout_ms=500, **GREEDY),
    )
    messages, errors = defaultdict(list), {}
    for response in stub.GenerateBidi(iter(outbox), timeout=120):
        if response.WhichOneof("event") == "error":
            errors[response.error.request_id] = response.error
        else:
            message = response.message
            messages[message.request_id].append(message)
            if message.request_id == "drop" and len(messages["drop"]) == 5:
                outbox.send(cancel("drop"))
                outbox.send(cancel("no such request"))  # ignored: nothing to end
        if len(errors) + sum(1 for ms in messages.values() if ms[-1].finish_reason) == 3:
            outbox.close()
    assert messages["drop"][-1].finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert len([m for m in messages["drop"] if m.token_ids]) < 1000
    assert errors["late"].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "late" not in [
        rid for rid, ms in messages.items() if ms[-1].finish_reason
    ]
    kept = messages["keep"]
    assert kept[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH and sum(len(m.token_ids) for m in kept) == 60
    assert set(errors) == {"late"}
    assert client.server_status().active_requests == 0


def test_bad_request_fails_only_itself(stub):
    requests = [
        generate("good", "fine", max_new_tokens=6, **GREEDY),
        generate("bad", "", max_new_tokens=6),
        generate("", "no id", max_new_tokens=6),
        generate("worse", "fine", max_new_tokens=0),
        inference_pb2.GenerateBidiRequest(),
        generate("good too", "fine", max_new_tokens=6, **GREEDY),
    ]
    errors, finished = {}, {}
    for response in stub.GenerateBidi(iter(requests), timeout=60):
        if response.WhichOneof("event") == "error":
            errors[response.error.request_id, response.error.message.split(":")[0]] = response.error.code
        elif response.message.finish_reason:
            finished[response.message.request_id] = response.message.usage.completion_tokens
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors == {
        ("bad", "prompt"): invalid,
        ("", "request_id"): invalid,
        ("worse", "max_new_tokens"): invalid,
        ("", "action"): invalid,
    }
    assert finished == {"good": 6, "good too": 6}


def test_duplicate_live_request_id_is_refused(stub):
    outbox = Outbox(generate("same", "first", max_new_tokens=200, **GREEDY), generate("same", "second", max_new_tokens=5, **GREEDY))
    responses = []
    for response in stub.GenerateBidi(iter(outbox), timeout=60):
        responses.append(response)
        if response.WhichOneof("event") == "message" and response.message.finish_reason:
            outbox.close()
    [error] = [r.error for r in responses if r.WhichOneof("event") == "error"]
    assert error.request_id == "same" and error.message.startswith("request_id: 'same' is already live")
    assert sum(len(r.message.token_ids) for r in responses if r.WhichOneof("event") == "message") == 200
