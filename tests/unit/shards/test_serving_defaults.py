"""What a Hugging Face folder says about serving it: chat template, bos/eos text, sampling defaults."""

import json

from shardgate.shards.serving_defaults import ServingDefaults


def write(folder, name, value):
    (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))


def test_hf_folder_fields(tmp_path):
    write(
        tmp_path,
        "tokenizer_config.json",
        {
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "bos_token": {"content": "<s>", "special": True},
            "eos_token": "</s>",
        },
    )
    write(tmp_path, "generation_config.json", {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20})
    assert ServingDefaults.from_hf_folder(tmp_path) == ServingDefaults("D", "<s>", "</s>", 0.6, 0.9, 20)


def test_template_file_and_greedy_generation_config(tmp_path):
    write(tmp_path, "chat_template.jinja", "{{ messages }}")
    write(tmp_path, "generation_config.json", {"do_sample": False, "temperature": 0.7})
    defaults = ServingDefaults.from_hf_folder(tmp_path)
    assert defaults.chat_template == "{{ messages }}" and defaults.temperature == 0.0 and defaults.top_k is None


def test_a_folder_that_says_nothing_gives_nones(tmp_path):
    assert ServingDefaults.from_hf_folder(tmp_path) == ServingDefaults()


def test_gguf_metadata_fields():
    metadata = {
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "C",
        "general.sampling.temp": 0.8,
        "general.sampling.top_k": 40,
    }
    assert ServingDefaults.from_gguf(metadata) == ServingDefaults("C", "<s>", "</s>", 0.8, None, 40)
