"""The engine API driven directly, with no gRPC: real engine loops over scripted replicas."""

import asyncio
import struct
from contextlib import aclosing

import grpc
import pytest
from fake_replica import EmbeddingReplica, ScriptedReplica

from shardgate.proto import inference_pb2, shard_pb2
from shardgate.server.block_manager import BlockManager
from shardgate.server.config import AdmissionConfig, GatewayConfig, SchedulerConfig, TelemetryConfig
from shardgate.server.embed_batcher import DynamicBatcher
from shardgate.server.engine import Engine
from shardgate.server.engine_api import EngineAPI
from shardgate.server.replicas.supervisor import ReplicaSupervisor
from shardgate.server.request import FinishReason
from shardgate.server.scheduler import Scheduler
from shardgate.server.telemetry import Telemetry
from shardgate.server.validation import RequestError
from shardgate.shards.builtin import EOS_ID, builtin_tokenizer

TOKENIZER = builtin_tokenizer()
H_, I_ = TOKENIZER.token_to_id("H"), TOKENIZER.token_to_id("I")
INFO = shard_pb2.DescribeResponse(
    model=inference_pb2.ModelInfoResponse(
        model="scripted",
        model_type="scripted",
        vocab_size=258,
        eos_token_ids=[EOS_ID],
        dtype="float32",
        tp=1,
        pp=1,
        replicas=1,
        kv_capacity_tokens=[256],
        devices=["cpu"],
        hidden_size=2,
        quantization="none",
        num_hidden_layers=1,
        num_key_value_heads=1,
        head_dim=2,
    ),
    max_position_embeddings=1024,
    tokenizer_json=TOKENIZER.to_str(),
    num_kv_blocks=64,
    block_size=4,
)


async def _no_change() -> None:
    pass


def serve(scenario, replicas, info=INFO, **config):
    """Runs scenario(api, engines) against an attached engine API whose engine loops run; every
    replica describes itself as `info`."""
    config = GatewayConfig(scheduler=SchedulerConfig(decode_steps=1), **config)
    telemetry = Telemetry(TelemetryConfig())

    async def main():
        batcher = DynamicBatcher(config.embed, config.scheduler.priority_aging_s)
        engines = [
            Engine(
                index,
                Scheduler(config.scheduler, BlockManager(INFO.num_kv_blocks, INFO.block_size)),
                replica,
                TOKENIZER,
                INFO.model.eos_token_ids,
                batcher,
                telemetry=telemetry.replica(index, 1),
            )
            for index, replica in enumerate(replicas)
        ]
        api = EngineAPI(config, telemetry)
        api.attach(engines, batcher, TOKENIZER, [info] * len(engines), [ReplicaSupervisor(e, config, _no_change) for e in engines])
        loops = [asyncio.create_task(engine.run()) for engine in engines]
        try:
            return await asyncio.wait_for(scenario(api, engines), 10)
        finally:
            for loop in loops:
                loop.cancel()

    return asyncio.run(main())


def request(first_token=10, max_new_tokens=8, **fields):
    return inference_pb2.GenerateRequest(
        request_id=f"r{first_token}",
        prompt_token_ids=inference_pb2.TokenIds(ids=[first_token, 1, 2]),
        max_new_tokens=max_new_tokens,
        temperature=0,
        **fields,
    )


async def collect(generation):
    async with aclosing(generation.outputs()) as outputs:
        return [output async for output in outputs]


def test_generate_streams_outputs_up_to_the_finish_reason_and_usage():
    async def scenario(api, engines):
        return await collect(await api.generate(request(max_new_tokens=5, logprobs=True)))

    outputs = serve(scenario, [ScriptedReplica({10: [H_, I_]})])
    assert "".join(o.text for o in outputs) == "HIHIH" and sum(len(o.token_ids) for o in outputs) == 5
    assert all(len(o.logprobs) == len(o.token_ids) for o in outputs)
    assert all(o.finish_reason is None and o.usage is None for o in outputs[:-1])
    last = outputs[-1]
    assert last.finish_reason is FinishReason.LENGTH and last.request_id == "r10"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.replica) == (3, 5, 0)


def test_generate_stops_at_eos_and_at_a_stop_string():
    async def scenario(api, engines):
        eos = await collect(await api.generate(request(10)))
        stop = await collect(await api.generate(request(11, stop=["IH"])))
        return eos, stop

    eos, stop = serve(scenario, [ScriptedReplica({10: [H_, I_, EOS_ID], 11: [H_, I_]})])
    assert eos[-1].finish_reason is FinishReason.EOS and "".join(o.text for o in eos) == "HI"
    assert stop[-1].finish_reason is FinishReason.STOP and "".join(o.text for o in stop) == "H"


def test_an_invalid_request_raises_the_typed_error_naming_the_field():
    async def scenario(api, engines):
        with pytest.raises(RequestError) as raised:
            await api.generate(request(max_new_tokens=0))
        return raised.value, api.in_flight()

    error, in_flight = serve(scenario, [ScriptedReplica({})])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "max_new_tokens"
    assert str(error).startswith("max_new_tokens: must be in [1, ") and in_flight == 0


def test_abort_ends_the_request_and_frees_its_blocks():
    async def scenario(api, engines):
        generation = await api.generate(request(max_new_tokens=200))
        async with aclosing(generation.outputs()) as outputs:
            first = await anext(outputs)
            busy = api.status().replicas[0].state
            api.abort(generation)
            rest = [output async for output in outputs]
        return first, busy, rest, api.status(), api.in_flight()

    first, busy, rest, status, in_flight = serve(scenario, [ScriptedReplica({10: [H_]})])
    assert first.token_ids == [H_] and busy.running == 1 and busy.free_blocks < busy.total_blocks
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    replica = status.replicas[0].state
    assert replica.free_blocks == replica.total_blocks and replica.running == replica.waiting == 0
    assert status.active_requests == in_flight == 0


def test_embed_returns_each_inputs_vector():
    async def scenario(api, engines):
        return await api.embed(inference_pb2.EmbedRequest(request_id="e", inputs=["ab", "c"]))

    result = serve(scenario, [EmbeddingReplica()])
    bos = TOKENIZER.token_to_id("<s>")
    assert [struct.unpack("<2f", v) for v in result.vectors] == [(3, bos + 97 + 98), (2, bos + 99)]
    assert result.input_tokens == [3, 2] and result.prompt_tokens == 5 and result.request_id == "e"


def test_admission_refuses_with_resource_exhausted():
    async def scenario(api, engines):
        held = await api.generate(request(10, max_new_tokens=50))
        with pytest.raises(RequestError) as raised:
            await api.generate(request(11))
        api.abort(held)
        return raised.value

    error = serve(scenario, [ScriptedReplica({10: [H_], 11: [H_]})], admission=AdmissionConfig(max_concurrent_requests=1))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.field == "max_concurrent_requests"


def test_no_healthy_replica_is_unavailable_and_releases_admission():
    async def scenario(api, engines):
        engines[0].fail("test")
        with pytest.raises(RequestError) as raised:
            await api.generate(request())
        return raised.value, api.in_flight(), api.serving

    error, in_flight, serving = serve(scenario, [ScriptedReplica({})])
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.field == "replicas" and in_flight == 0 and not serving


def test_a_request_on_a_failed_replica_that_sent_nothing_runs_on_another():
    async def scenario(api, engines):
        return await collect(await api.generate(request(max_new_tokens=3)))

    outputs = serve(scenario, [ScriptedReplica({10: [H_]}, fail_at_step=1), ScriptedReplica({10: [I_]})])
    assert "".join(o.text for o in outputs) == "III" and outputs[-1].usage.replica == 1


def test_a_replica_failing_after_tokens_raises_unavailable_after_them():
    async def scenario(api, engines):
        outputs = []
        with pytest.raises(RequestError) as raised:
            async with aclosing((await api.generate(request(max_new_tokens=50))).outputs()) as stream:
                async for output in stream:
                    outputs.append(output)
        return outputs, raised.value

    outputs, error = serve(scenario, [ScriptedReplica({10: [H_]}, fail_at_step=3)])
    assert [o.token_ids for o in outputs] == [[H_], [H_]] and error.code == grpc.StatusCode.UNAVAILABLE and error.field is None


def test_draining_refuses_new_calls_and_abort_all_cancels_in_flight():
    async def scenario(api, engines):
        generation = await api.generate(request(max_new_tokens=200))
        api.drain()
        with pytest.raises(RequestError) as raised:
            api.describe()
        api.abort_all()
        return await collect(generation), raised.value, api.in_flight()

    outputs, error, in_flight = serve(scenario, [ScriptedReplica({10: [H_]})])
    assert outputs[-1].finish_reason is FinishReason.CANCELLED and in_flight == 0
    assert error.code == grpc.StatusCode.UNAVAILABLE and str(error) == "the server is shutting down"


def test_every_call_before_attach_is_unavailable():
    api = EngineAPI(GatewayConfig(), Telemetry(TelemetryConfig()))
    for call in (
        lambda: asyncio.run(api.generate(request())),
        api.describe,
        api.status,
        lambda: asyncio.run(api.tokenize(inference_pb2.TokenizeRequest(text="a"))),
    ):
        with pytest.raises(RequestError, match="^the model is still loading$"):
            call()
    assert api.in_flight() == 0 and not api.serving


def test_describe_and_tokenize():
    async def scenario(api, engines):
        return api.describe(), await api.tokenize(inference_pb2.TokenizeRequest(text="HI"))

    description, tokenized = serve(scenario, [ScriptedReplica({}), ScriptedReplica({})])
    assert description.model == "scripted" and description.replicas == 2 and description.max_context_tokens == 256
    assert list(description.kv_capacity_tokens) == [256, 256]
    assert (tokenized.text, tokenized.token_ids, tokenized.tokens) == ("HI", [H_, I_], ["H", "I"])
    assert not description.has_chat_template and not description.HasField("default_temperature")


# --- chat and the model's sampling defaults ------------------------------------------------

BOS = TOKENIZER.token_to_id("<s>")
CHAT_INFO = shard_pb2.DescribeResponse()
CHAT_INFO.CopyFrom(INFO)
CHAT_INFO.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
CHAT_INFO.bos_token = "<s>"
CHAT_INFO.model.has_chat_template = True
CHAT_INFO.model.default_temperature = 0.5
CHAT_INFO.model.default_top_k = 3


def chat(*contents: str, **fields) -> inference_pb2.GenerateRequest:
    messages = [inference_pb2.ChatMessage(role="user", content=content) for content in contents]
    return inference_pb2.GenerateRequest(messages=inference_pb2.ChatMessages(messages=messages), max_new_tokens=2, **fields)


def test_a_chat_request_runs_the_rendered_prompt_with_the_models_defaults():
    async def scenario(api, engines):
        defaulted = await collect(await api.generate(chat("H", "I")))
        explicit = await collect(await api.generate(chat("I", temperature=0.0, top_p=0.9, top_k=0)))
        return defaulted, explicit

    replica = ScriptedReplica({BOS: [H_]})
    defaulted, explicit = serve(scenario, [replica], info=CHAT_INFO)
    assert "".join(o.text for o in defaulted) == "HH" and explicit[-1].finish_reason is FinishReason.LENGTH
    first, second = _first_chunks(replica)
    # The template writes the BOS itself: the prompt has it once (no special tokens added on top).
    assert first.prompt_ids == [BOS, H_, I_, ord(">")] and second.prompt_ids == [BOS, I_, ord(">")]
    assert (first.params.temperature, first.params.top_p, first.params.top_k) == (0.5, 1.0, 3)
    assert (second.params.temperature, second.params.top_p, second.params.top_k) == (0.0, pytest.approx(0.9), 0)


def _first_chunks(replica: ScriptedReplica) -> list:
    """Each request's first scheduled chunk's request, in order of arrival."""
    requests = {}
    for plan in replica.plans:
        for chunk in plan.chunks:
            requests.setdefault(chunk.request.request_id, chunk.request)
    return list(requests.values())


def test_tokenize_renders_messages_as_a_chat_request_would():
    async def scenario(api, engines):
        messages = chat("HI").messages
        return await api.tokenize(inference_pb2.TokenizeRequest(messages=messages, add_special_tokens=True))

    tokenized = serve(scenario, [ScriptedReplica({})], info=CHAT_INFO)
    assert tokenized.text == "<s>HI>" and tokenized.token_ids == [BOS, H_, I_, ord(">")]


def test_messages_to_a_model_without_a_chat_template_are_invalid():
    async def scenario(api, engines):
        errors = []
        for call in (lambda: api.generate(chat("HI")), lambda: api.tokenize(inference_pb2.TokenizeRequest(messages=chat("HI").messages))):
            with pytest.raises(RequestError) as raised:
                await call()
            errors.append(raised.value)
        return errors, api.in_flight()

    errors, in_flight = serve(scenario, [ScriptedReplica({})])
    assert in_flight == 0
    for error in errors:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(error) == "messages: the model has no chat template; send a prompt instead"


# --- input size and the tokenizer pool ------------------------------------------------------


def test_a_prompt_the_context_could_never_hold_is_refused_by_its_length_untokenized():
    class Untouchable:
        """Stands in for the tokenizer: refusing by length must not tokenize."""

        def __getattr__(self, name):
            raise AssertionError(f"tokenizer.{name} used")

    async def scenario(api, engines):
        api.tokenizer = Untouchable()
        errors = []
        for call in (
            lambda: api.generate(inference_pb2.GenerateRequest(prompt="x" * 5000, max_new_tokens=1)),
            lambda: api.generate(_token_ids(300)),
            lambda: api.embed(inference_pb2.EmbedRequest(inputs=["ok", "y" * 5000])),
        ):
            with pytest.raises(RequestError) as raised:
                await call()
            errors.append(raised.value)
        return errors, api.in_flight()

    (prompt, ids, embed), in_flight = serve(scenario, [EmbeddingReplica()])
    # The context is 256 tokens (64 blocks of 4) and a builtin token covers at most 4 characters.
    assert prompt.field == "prompt" and "5000 characters make more than 256 tokens" in str(prompt)
    assert ids.field == "prompt_token_ids" and "300 tokens exceed the model context (256 tokens)" in str(ids)
    assert embed.field == "inputs[1]" and all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in (prompt, ids, embed)) and in_flight == 0


def _token_ids(n: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt_token_ids=inference_pb2.TokenIds(ids=[1] * n), max_new_tokens=1)


def test_tokenize_is_admitted_like_a_generation():
    async def scenario(api, engines):
        held = await api.generate(request(10, max_new_tokens=50))
        with pytest.raises(RequestError) as raised:
            await api.tokenize(inference_pb2.TokenizeRequest(text="HI"))
        api.abort(held)
        await collect(held)
        return raised.value, (await api.tokenize(inference_pb2.TokenizeRequest(text="HI"))).token_ids, api.in_flight()

    error, ids, in_flight = serve(scenario, [ScriptedReplica({10: [H_]})], admission=AdmissionConfig(max_concurrent_requests=1))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.field == "max_concurrent_requests"
    assert ids == [H_, I_] and in_flight == 0


def test_timeout_ms_counts_from_arrival_time_spent_tokenizing_included():
    async def scenario(api, engines):
        run = api.tokenizer_pool.run

        async def slow_run(work):
            await asyncio.sleep(0.3)  # a busy tokenizer pool
            return await run(work)

        api.tokenizer_pool.run = slow_run
        generation = await api.generate(request(max_new_tokens=50, timeout_ms=200))
        with pytest.raises(RequestError) as raised:
            await collect(generation)
        return raised.value, engines[0].replica.plans

    error, plans = serve(scenario, [ScriptedReplica({10: [H_]})])
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and not plans  # it expired in the queue, never ran
