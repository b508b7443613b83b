"""The chat template renderer (server/chat_template.py): real templates' prompts, the helpers and
variables templates expect, its sandbox, its errors, and the same strings as transformers'."""

from datetime import datetime

import pytest

from shardgate.server.chat_template import ChatTemplate, ChatTemplateError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (  # refuses a conversation whose roles do not alternate
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chatml_ends_with_the_assistants_turn_when_asked():
    template = ChatTemplate(CHATML)
    assert template.render(CONVERSATION[1:2]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(CONVERSATION[1:2], add_generation_prompt=False) == "<|im_start|>user\nHi there<|im_end|>\n"


def test_llama3_gets_the_bos_token_text():
    rendered = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>").render(CONVERSATION[:2])
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_special_tokens_the_model_does_not_name_are_undefined():
    template = ChatTemplate("{{ bos_token is defined }} {{ eos_token }}|{{ tools is none }}")
    assert template.render(CONVERSATION) == "False |True"
    assert ChatTemplate("{{ bos_token }}{{ eos_token }}", "<s>", "</s>").render(CONVERSATION) == "<s></s>"


def test_the_helpers_templates_expect():
    template = ChatTemplate(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }} {{ messages[0] | tojson }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') }}"
        "{% generation %}!{% endgeneration %}"
    )
    assert template.render([{"role": "user", "content": "é <b>"}] * 3) == (
        f'2 {{"role": "user", "content": "é <b>"}} {{"a": 1}} {datetime.now():%Y}!'  # tojson escapes no HTML, keeps accents
    )


def test_a_template_that_raises_gives_its_message():
    template = ChatTemplate(MISTRAL, "<s>", "</s>")
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__base__ }}",  # the sandbox refuses underscore attributes
        "{% set ns = namespace() %}{% set ns._x = 1 %}",  # and namespace attributes that start with one
        "{{ messages.append(1) }}",  # and mutating its inputs
        "{{ messages[0]['content'] + 1 }}",  # a Python error inside the template
    ],
)
def test_unsafe_or_failing_templates_raise_chat_template_errors(source):
    with pytest.raises(ChatTemplateError, match="^the model's chat template failed on these messages: "):
        ChatTemplate(source).render(CONVERSATION)


def test_a_template_that_does_not_compile_raises_on_every_render():
    template = ChatTemplate("{% for m in messages %}")
    assert template.compile_error.startswith("the model's chat template does not compile: ")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        template.render(CONVERSATION)


# --- parity with transformers ---------------------------------------------------------------

CONVERSATIONS = [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3], [{"role": "user", "content": "  spaces \n and ünïcode 日本 🙂 "}]]


@pytest.mark.parametrize("source", [CHATML, LLAMA3, MISTRAL], ids=["chatml", "llama3", "mistral"])
def test_same_prompt_as_transformers_renderer(source):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = ChatTemplate(source, "<s>", "</s>")
    for conversation in CONVERSATIONS[1:]:
        for add_generation_prompt in (True, False):
            [expected], _ = chat_template_utils.render_jinja_template(
                [conversation], chat_template=source, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
            )
            if source is MISTRAL and conversation[-1]["role"] == "assistant":  # MISTRAL renders nothing after an assistant turn
                continue
            assert template.render(conversation, add_generation_prompt) == expected


def test_smollm2_template_renders_as_transformers_apply_chat_template(smollm2_hf_tokenizer):
    tokenizer = smollm2_hf_tokenizer
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    for conversation in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert template.render(conversation) == expected
