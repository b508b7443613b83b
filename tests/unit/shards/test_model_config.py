import dataclasses

import pytest

from shardgate.shards.model_config import ModelConfig

# Llama-3.2-1B's config.json as saved by transformers 4 (rope_theta + rope_scaling).
LLAMA32_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

# Qwen2.5-7B-Instruct with the YaRN block its model card suggests (old "type" key).
QWEN25_V4 = {
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def v5_layout(config: dict) -> dict:
    """The same config as transformers 5 saves it: rope_theta and the scaling inside rope_parameters."""
    config = dict(config)
    scaling = config.pop("rope_scaling") or {"rope_type": "default"}
    config["rope_parameters"] = {**scaling, "rope_theta": config.pop("rope_theta")}
    return config


def test_llama3_v4_and_v5_layouts_read_the_same():
    v4 = ModelConfig.from_hf(LLAMA32_V4)
    assert v4 == ModelConfig.from_hf(v5_layout(LLAMA32_V4))
    assert v4.rope_theta == 500000.0
    assert v4.rope_scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    assert (v4.head_dim, v4.num_key_value_heads, v4.tie_word_embeddings) == (64, 8, True)
    assert v4.eos_token_ids == (128001, 128008, 128009)
    assert (v4.architecture, v4.attention_bias, v4.sliding_window) == ("LlamaForCausalLM", False, None)


def test_qwen2_yarn_with_old_type_key():
    config = ModelConfig.from_hf(QWEN25_V4)
    assert config == ModelConfig.from_hf(v5_layout(QWEN25_V4))
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert config.attention_bias  # Qwen2 always has q/k/v biases
    assert config.head_dim == 3584 // 28
    assert config.sliding_window is None


def test_default_rope_is_none_in_both_layouts():
    plain = {k: v for k, v in LLAMA32_V4.items() if k != "rope_scaling"}
    assert ModelConfig.from_hf(plain).rope_scaling is None
    assert ModelConfig.from_hf(plain).rope_type == "default"
    v5 = {k: v for k, v in plain.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert ModelConfig.from_hf(v5).rope_theta == 1234.0
    assert ModelConfig.from_hf(v5).rope_scaling is None


def test_linear_rope_with_old_type_key():
    config = ModelConfig.from_hf({**LLAMA32_V4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_yarn_pretraining_length_defaults_to_max_positions():
    config = ModelConfig.from_hf({**QWEN25_V4, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert config.rope_scaling["original_max_position_embeddings"] == 32768


def test_eos_ids_union_config_and_generation_config():
    config = ModelConfig.from_hf(QWEN25_V4, {"bos_token_id": 151643, "eos_token_id": [151645, 151643]})
    assert config.eos_token_ids == (151645, 151643)
    config = ModelConfig.from_hf({**QWEN25_V4, "eos_token_id": None}, {"eos_token_id": 151643})
    assert config.eos_token_ids == (151643,)


def test_bos_falls_back_to_generation_config():
    config = ModelConfig.from_hf({**QWEN25_V4, "bos_token_id": None}, {"bos_token_id": 7})
    assert config.bos_token_id == 7


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="'gpt2'"):
        ModelConfig.from_hf({**LLAMA32_V4, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="None"):
        ModelConfig.from_hf({k: v for k, v in LLAMA32_V4.items() if k != "model_type"})


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf({**LLAMA32_V4, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})


def test_head_dim_explicit_or_derived():
    mistral_nemo_like = {
        **LLAMA32_V4,
        "model_type": "mistral",
        "hidden_size": 5120,
        "num_attention_heads": 32,
        "head_dim": 128,
        "sliding_window": None,
    }
    assert ModelConfig.from_hf(mistral_nemo_like).head_dim == 128
    uneven = {k: v for k, v in LLAMA32_V4.items() if k != "head_dim"}
    uneven |= {"num_attention_heads": 30, "num_key_value_heads": 10}
    with pytest.raises(ValueError, match="must divide hidden_size"):
        ModelConfig.from_hf(uneven)
    assert ModelConfig.from_hf({**uneven, "head_dim": 64}).head_dim == 64


def test_mistral_sliding_window():
    mistral = {**LLAMA32_V4, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "max_position_embeddings": 32768}
    assert ModelConfig.from_hf({**mistral, "sliding_window": 4096}).sliding_window == 4096
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).sliding_window is None
    assert ModelConfig.from_hf({**mistral, "sliding_window": 32768}).sliding_window is None
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf({**QWEN25_V4, "use_sliding_window": True})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 5}, "must divide"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"eos_token_id": 999999}, "outside the vocabulary"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "not a causal language model"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"intermediate_size": None}, "lacks intermediate_size"),
    ],
)
def test_invalid_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**LLAMA32_V4, **change})


def test_direct_construction_is_validated():
    config = ModelConfig.from_hf(LLAMA32_V4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        dataclasses.replace(config, head_dim=63)
    with pytest.raises(ValueError, match="eos"):
        dataclasses.replace(config, eos_token_ids=())
    with pytest.raises(ValueError, match="rope_scaling must be None"):
        dataclasses.replace(config, rope_scaling={"rope_type": "default"})
