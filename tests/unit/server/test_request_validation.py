"""Request validation (server/validation.py): each refusal is INVALID_ARGUMENT naming its field,
each limit admits its boundary value, and a valid message becomes the request the engine runs."""

import math

import grpc
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

from shardgate.proto import inference_pb2
from shardgate.server.chat_template import ChatTemplate
from shardgate.server.config import GatewayConfig
from shardgate.server.embed_batcher import Pooling
from shardgate.server.validation import (
    API_DEFAULTS,
    MAX_REQUEST_ID_CHARS,
    ModelLimits,
    RequestError,
    SamplingDefaults,
    validate,
    validate_embed,
)

BOS = 256
VOCAB = 300  # the model's vocabulary is larger than the tokenizer's 257 tokens, as real ones often are
LIMITS = ModelLimits(vocab_size=VOCAB, max_context_tokens=64, max_embed_tokens=16)
CONFIG = GatewayConfig()


def byte_tokenizer() -> Tokenizer:
    """Byte-level: one token per byte of the text (ids 0-255), "<s>" (id 256) prepended on encode."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken("<s>", special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tokenizer


TOKENIZER = byte_tokenizer()


def check(**fields):
    fields.setdefault("max_new_tokens", 4)
    return validate(inference_pb2.GenerateRequest(**fields), TOKENIZER, LIMITS, CONFIG)


CHAT = ChatTemplate(
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('no booms') }}{% endif %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}",
    bos_token="<s>",
)


def check_chat(*messages: tuple[str, str], template: ChatTemplate | None = CHAT, defaults=API_DEFAULTS, **fields):
    fields.setdefault("max_new_tokens", 4)
    chat = inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role=role, content=content) for role, content in messages])
    return validate(inference_pb2.GenerateRequest(messages=chat, **fields), TOKENIZER, LIMITS, CONFIG, template, defaults)


def check_embed(**fields):
    return validate_embed(inference_pb2.EmbedRequest(**fields), TOKENIZER, LIMITS, CONFIG)


def token_ids(*ids: int) -> inference_pb2.TokenIds:
    return inference_pb2.TokenIds(ids=list(ids))


# --- refusals -----------------------------------------------------------------------------

LIMIT = CONFIG.max_new_tokens_limit
GENERATE_REFUSALS = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "no prompt at all": (dict(), "prompt"),
    "empty token ids": (dict(prompt_token_ids=token_ids()), "prompt_token_ids"),
    "token id at the vocab size": (dict(prompt_token_ids=token_ids(1, VOCAB)), "prompt_token_ids"),
    "max_new_tokens 0": (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens over the limit": (dict(prompt="hi", max_new_tokens=LIMIT + 1), "max_new_tokens"),
    "prompt + max_new_tokens over the context": (dict(prompt="x" * 60, max_new_tokens=4), "max_new_tokens"),
    "token prompt over the context": (dict(prompt_token_ids=token_ids(*[1] * 61), max_new_tokens=4), "max_new_tokens"),
    "negative temperature": (dict(prompt="hi", temperature=-0.5), "temperature"),
    "nan temperature": (dict(prompt="hi", temperature=math.nan), "temperature"),
    "infinite temperature": (dict(prompt="hi", temperature=math.inf), "temperature"),
    "top_p zero": (dict(prompt="hi", top_p=0.0), "top_p"),
    "top_p above one": (dict(prompt="hi", top_p=1.5), "top_p"),
    "nan top_p": (dict(prompt="hi", top_p=math.nan), "top_p"),
    "negative top_k": (dict(prompt="hi", top_k=-1), "top_k"),
    "too many stop strings": (dict(prompt="hi", stop=["s"] * (CONFIG.max_stop_strings + 1)), "stop"),
    "empty stop string": (dict(prompt="hi", stop=["ok", ""]), "stop[1]"),
    "stop string too long": (dict(prompt="hi", stop=["x" * (CONFIG.max_stop_string_chars + 1)]), "stop[0]"),
    "request id too long": (dict(prompt="hi", request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id"),
    "priority too high": (dict(prompt="hi", priority=101), "priority"),
    "priority too low": (dict(prompt="hi", priority=-101), "priority"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_REFUSALS))
def test_each_bad_generate_field_is_invalid_argument_naming_it(case):
    fields, field = GENERATE_REFUSALS[case]
    with pytest.raises(RequestError) as raised:
        check(**fields)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


CHAT_REFUSALS = {
    "a model without a chat template": (dict(messages=[("user", "hi")], template=None), "messages", "the model has no chat template"),
    "no messages": (dict(messages=[]), "messages", "must not be empty"),
    "an empty role": (dict(messages=[("user", "hi"), ("", "x")]), "messages[1].role", "must be set (one of system, user, assistant, tool)"),
    "an unknown role": (
        dict(messages=[("wizard", "hi")]),
        "messages[0].role",
        "unknown role 'wizard'; expected one of system, user, assistant, tool",
    ),
    "a template that raises": (dict(messages=[("user", "boom")]), "messages", "no booms"),
    "a template that does not compile": (dict(messages=[("user", "hi")], template=ChatTemplate("{% if %}")), "messages", "not compile"),
    "an empty rendered prompt": (dict(messages=[("user", "hi")], template=ChatTemplate("")), "messages", "empty prompt"),
    "a rendered prompt over the context": (dict(messages=[("user", "x" * 60)]), "max_new_tokens", "exceeds the model context"),
}


@pytest.mark.parametrize("case", sorted(CHAT_REFUSALS))
def test_each_bad_chat_request_is_invalid_argument_naming_messages(case):
    fields, field, words = CHAT_REFUSALS[case]
    with pytest.raises(RequestError) as raised:
        check_chat(*fields.pop("messages"), **fields)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ") and words in str(raised.value)


EMBED_REFUSALS = {
    "no inputs": (dict(inputs=[]), "inputs"),
    "too many inputs": (dict(inputs=["x"] * (CONFIG.embed.max_inputs + 1)), "inputs"),
    "an empty input": (dict(inputs=["ok", ""]), "inputs[1]"),
    "an input over the longest": (dict(inputs=["ok", "y" * 16]), "inputs[1]"),  # 16 bytes + BOS > 16 tokens
    "unknown pooling": (dict(inputs=["x"], pooling=7), "pooling"),
    "priority too low": (dict(inputs=["x"], priority=-101), "priority"),
    "request id too long": (dict(inputs=["x"], request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id"),
}


@pytest.mark.parametrize("case", sorted(EMBED_REFUSALS))
def test_each_bad_embed_field_is_invalid_argument_naming_it(case):
    fields, field = EMBED_REFUSALS[case]
    with pytest.raises(RequestError) as raised:
        check_embed(**fields)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_refusals_say_the_limit_and_the_value():
    with pytest.raises(RequestError, match=rf"^max_new_tokens: must be in \[1, {LIMIT}\], got 0$"):
        check(prompt="hi", max_new_tokens=0)
    with pytest.raises(RequestError, match=rf"^prompt_token_ids: token id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)$"):
        check(prompt_token_ids=token_ids(5, VOCAB, VOCAB + 1))  # the first bad id
    with pytest.raises(RequestError, match=r"prompt \(61 tokens\) \+ max_new_tokens \(4\) exceeds the model context \(64 tokens\)"):
        check(prompt="x" * 60, max_new_tokens=4)
    with pytest.raises(RequestError, match=r"^priority: must be in \[-100, 100\], got 101$"):
        check(prompt="hi", priority=101)
    with pytest.raises(RequestError, match=r"^inputs\[0\]: 17 tokens exceed the longest input \(16 tokens\)$"):
        check_embed(inputs=["y" * 16])


# --- boundaries and results ---------------------------------------------------------------


def test_text_prompt_is_tokenized_with_special_tokens_and_token_ids_pass_as_given():
    assert check(prompt="hi").prompt_ids == [BOS, *TOKENIZER.encode("hi", add_special_tokens=False).ids]
    assert len(check(prompt="hi").prompt_ids) == 3
    assert check(prompt_token_ids=token_ids(7, 0, VOCAB - 1)).prompt_ids == [7, 0, VOCAB - 1]  # no BOS added; the last id fits


def test_each_limit_admits_its_boundary():
    big = ModelLimits(vocab_size=VOCAB, max_context_tokens=LIMIT + 8, max_embed_tokens=16)
    message = inference_pb2.GenerateRequest(prompt="hi", max_new_tokens=LIMIT)
    assert validate(message, TOKENIZER, big, CONFIG).params.max_new_tokens == LIMIT
    assert len(check(prompt="x" * 59, max_new_tokens=4).prompt_ids) == 60  # 60 + 4 == the context
    assert check(prompt_token_ids=token_ids(*[1] * 60), max_new_tokens=4).params.max_new_tokens == 4
    stops = ["x" * CONFIG.max_stop_string_chars] * CONFIG.max_stop_strings
    assert check(prompt="hi", stop=stops).stop == stops
    assert check(prompt="hi", priority=100).priority == 100 and check(prompt="hi", priority=-100).priority == -100
    assert check(prompt="hi", request_id="r" * MAX_REQUEST_ID_CHARS).request_id == "r" * MAX_REQUEST_ID_CHARS
    assert check(prompt="hi", temperature=0.0, top_p=1.0, top_k=0).params.temperature == 0.0  # greedy
    assert len(check_embed(inputs=["y" * 15]).inputs[0]) == 16  # 15 bytes + BOS == the longest input
    assert len(check_embed(inputs=["x"] * CONFIG.embed.max_inputs).inputs) == CONFIG.embed.max_inputs


def test_sampling_settings_are_carried_and_defaults_filled():
    valid = check(prompt="hi", max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=40, seed=123, ignore_eos=True, logprobs=True, stop=["."])
    params = valid.params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (9, 0.5, pytest.approx(0.9), 40, 123)
    assert params.ignore_eos and params.logprobs and valid.stop == ["."]

    plain = check(prompt="hi").params
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)  # unset: sample from the whole distribution
    assert not plain.ignore_eos and not plain.logprobs
    assert 0 <= plain.seed < 2**63 and check(prompt="hi").params.seed != plain.seed  # unset: a fresh seed per request


def test_messages_are_rendered_and_tokenized_without_adding_special_tokens():
    valid = check_chat(("system", "be"), ("user", "hi"), ("assistant", "yo"), ("tool", "42"), ("user", ""))
    rendered = "<s>[system]be[user]hi[assistant]yo[tool]42[user][assistant]"
    assert valid.prompt_ids == TOKENIZER.encode(rendered, add_special_tokens=False).ids
    assert valid.prompt_ids[0] == BOS and valid.prompt_ids.count(BOS) == 1  # the template's BOS, not one more


def test_the_models_sampling_defaults_fill_only_unset_parameters():
    model = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20)
    plain = check_chat(("user", "hi"), defaults=model).params
    assert (plain.temperature, plain.top_p, plain.top_k) == (0.6, pytest.approx(0.9), 20)
    explicit = check_chat(("user", "hi"), defaults=model, temperature=0.0, top_p=1.0, top_k=0).params
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (0.0, 1.0, 0)  # set, even to "off", beats the model's


def test_sampling_defaults_of_a_model_info():
    info = inference_pb2.ModelInfoResponse(default_temperature=0.0, default_top_k=40)
    assert SamplingDefaults.of_model(info) == SamplingDefaults(temperature=0.0, top_p=1.0, top_k=40)
    assert SamplingDefaults.of_model(inference_pb2.ModelInfoResponse()) == SamplingDefaults(1.0, 1.0, 0)  # the model says nothing


def test_request_id_priority_and_deadline():
    valid = check(prompt="hi", request_id="mine", priority=-3, timeout_ms=1500)
    assert (valid.request_id, valid.priority, valid.timeout_s) == ("mine", -3, 1.5)
    first, second = check(prompt="hi"), check(prompt="hi")
    assert first.request_id and first.request_id != second.request_id  # none given: a fresh one
    assert first.timeout_s is None and first.priority == 0


def test_valid_embed_tokenizes_each_input_and_maps_its_options():
    valid = check_embed(inputs=["ab", "c"], pooling=inference_pb2.POOLING_LAST, normalize=True, priority=5, timeout_ms=250, request_id="e")
    assert valid.inputs == [TOKENIZER.encode(text, add_special_tokens=True).ids for text in ("ab", "c")]
    assert [len(ids) for ids in valid.inputs] == [3, 2] and all(ids[0] == BOS for ids in valid.inputs)
    assert (valid.pooling, valid.normalize, valid.priority, valid.timeout_s, valid.request_id) == (Pooling.LAST, True, 5, 0.25, "e")
    plain = check_embed(inputs=["x"])
    assert (plain.pooling, plain.normalize, plain.timeout_s) == (Pooling.MEAN, False, None) and plain.request_id
