"""The OpenAI-compatible HTTP frontend of a real `shardgate serve --http-port`, driven by the
real `openai` SDK: models, completions, chat (streamed and not), embeddings, n, stop strings,
errors (400, 401, 404, 429, 504), a stream closed early freeing its KV, and greedy output equal
to the native API's."""

import math

import openai
import pytest
from servers import start_server, wait_until
from tiny_checkpoints import make_checkpoint

from shardgate.clients import Client
from shardgate.proto.common import free_port

KEY = "test-key"
# The tiny llama checkpoint has no chat template of its own: give it a plain one.
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
CONCURRENCY = 2
"""--max-concurrent-requests: a third request in flight gets 429."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("model") / "tiny-llama")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"other-key\n{KEY}\n")
    http_port = free_port()
    flags = ["--model", str(folder), "--http-port", str(http_port), "--api-key-file", str(keys)]
    flags += ["--max-concurrent-requests", str(CONCURRENCY), "--kv-cache-memory", str(16 << 20)]
    running = start_server(tmp_path_factory.mktemp("logs"), *flags)
    running.http_base = f"http://127.0.0.1:{http_port}/v1"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(server):
    return "tiny-llama"


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=server.http_base, api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def native(server):
    with Client(server.address, timeout=60, token=KEY) as client:
        yield client


def test_models_list_names_the_served_model(oai, model):
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model


def test_completion_of_text_and_token_ids_equals_native_greedy(oai, native, model):
    ids = native.tokenize("The quick brown fox", add_special_tokens=True)
    for prompt in ("The quick brown fox", ids):
        expected = native.generate(prompt, max_new_tokens=12, temperature=0)
        got = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
        choice = got.choices[0]
        assert choice.text == expected.text
        assert choice.model_extra["token_ids"] == expected.token_ids
        assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(expected.token_ids)


def test_chat_streamed_and_not_agree_with_native_chat(oai, native, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = native.chat(messages, max_new_tokens=10, temperature=0)
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    chunks = list(
        oai.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_chat_logprobs_are_the_chosen_tokens(oai, native, model):
    messages = [{"role": "user", "content": "Hi"}]
    expected = native.chat(messages, max_new_tokens=5, temperature=0, logprobs=True)
    got = oai.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True)
    assert [t.logprob for t in got.choices[0].logprobs.content] == pytest.approx(expected.logprobs)


def test_embeddings_have_unit_length_in_both_encodings(oai, model):
    for encoding in ({"encoding_format": "float"}, {}):  # unless told, the SDK asks for base64 and decodes it
        result = oai.embeddings.create(model=model, input=["one text", "another text"], **encoding)
        assert [d.index for d in result.data] == [0, 1]
        assert all(math.isclose(math.hypot(*d.embedding), 1.0, rel_tol=1e-4) for d in result.data)
        assert result.usage.prompt_tokens > 0


def test_n_choices_share_the_prompt(oai, model):
    one = oai.completions.create(model=model, prompt="Paged attention", max_tokens=6, temperature=0)
    result = oai.completions.create(model=model, prompt="Paged attention", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].text == result.choices[1].text == one.choices[0].text  # greedy: the same
    assert result.usage.completion_tokens == 12 and result.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once


def test_stop_string_ends_the_text_before_it(oai, native, model):
    full = native.generate("the the and", max_new_tokens=24, temperature=0, ignore_eos=True).text
    stop = full[6:9]
    assert stop and stop in full
    got = oai.completions.create(
        model=model, prompt="the the and", max_tokens=24, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"n": 99}, "n"),
        ({"made_up": 1}, "made_up"),
        ({"prompt": [10**9]}, "prompt"),
    ],
)
def test_bad_parameters_are_400_naming_them(oai, model, params, param):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model=model, prompt="hi", max_tokens=4, extra_body=params)  # extra_body wins
    assert raised.value.status_code == 400 and raised.value.param == param, raised.value.body
    assert raised.value.type == "invalid_request_error"


def test_wrong_model_is_404_and_wrong_key_401(server, oai):
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert raised.value.code == "model_not_found"
    with openai.OpenAI(base_url=server.http_base, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_deadline_from_the_sdk_timeout_header_is_504(oai, model):
    with pytest.raises(openai.InternalServerError) as raised:
        oai.completions.create(
            model=model, prompt="hi", max_tokens=200, extra_body={"ignore_eos": True}, extra_headers={"X-Stainless-Timeout": "0.001"}
        )
    assert raised.value.status_code == 504


def test_full_admission_is_429_with_retry_after(oai, native, model):
    streams = [
        oai.completions.create(model=model, prompt=f"busy {i}", max_tokens=240, temperature=0, stream=True, extra_body={"ignore_eos": True})
        for i in range(CONCURRENCY)
    ]
    try:
        for stream in streams:
            next(iter(stream))  # both admitted and generating
        with pytest.raises(openai.RateLimitError) as raised:
            oai.completions.create(model=model, prompt="one more", max_tokens=4)
        assert raised.value.response.headers["retry-after"] == "1"
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: native.server_status().active_requests == 0, what="the streams ended")


def test_a_stream_closed_early_frees_its_kv(oai, native, model):
    baseline = native.server_status().replicas[0].free_kv_blocks
    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "go on"}], max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert native.server_status().replicas[0].free_kv_blocks < baseline  # it holds blocks while it runs
    stream.close()
    wait_until(lambda: native.server_status().active_requests == 0, what="the request was aborted")
    wait_until(lambda: native.server_status().replicas[0].free_kv_blocks == baseline, what="its KV blocks were freed")


def test_n_streamed_choices_interleave_and_fill_the_context_without_max_tokens(oai, model):
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me everything about the quick brown fox " * 5}],  # ~190 of 256 positions
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts[0] == texts[1] and finishes == {0: "length", 1: "length"}  # greedy: the same, each ended once
    usage = chunks[-1].usage  # no max_tokens: each choice gets all the context the prompt leaves (256 positions)
    assert usage.prompt_tokens + usage.completion_tokens // 2 == 256
