import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shardgate.shards.model_config import ModelConfig
from shardgate.shards.rope import RotaryEmbedding, apply_rotary, rope_frequencies

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 24,
        "beta_slow": 2,
    },
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "attention_factor": 0.8,
        "truncate": False,
    },
}


def configs(kind: str) -> tuple[LlamaConfig, ModelConfig]:
    hf = LlamaConfig(
        vocab_size=100,
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=dict(ROPE_PARAMETERS[kind]),
    )
    return hf, ModelConfig.from_hf(hf.to_dict())


@pytest.mark.parametrize("kind", ROPE_PARAMETERS)
def test_frequencies_match_transformers(kind):
    hf, ours = configs(kind)
    rope_type = ROPE_PARAMETERS[kind]["rope_type"]
    if rope_type == "default":
        expected, expected_scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    inv_freq, scaling = rope_frequencies(ours)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(expected_scaling, rel=1e-12)


@pytest.mark.parametrize("kind", ["llama3", "yarn-mscale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_matches_transformers_at_arbitrary_positions(kind, dtype):
    hf, ours = configs(kind)
    positions = torch.tensor([0, 4095, 17, 17, 3, 1000, 2048, 1])  # packed tokens: any order, repeats
    q = torch.randn(len(positions), 4, 64).to(dtype)  # (T, n_heads, head_dim)
    k = torch.randn(len(positions), 2, 64).to(dtype)

    cos, sin = RotaryEmbedding(ours)(positions, dtype)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf)(q, positions[None])  # (1, T, head_dim)
    expected_q, expected_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin
    )  # (1, heads, T, head_dim)

    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(q, cos, sin), expected_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), expected_k[0].transpose(0, 1), rtol=0, atol=0)


def test_rotation_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    _, config = configs("default")
    rope = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(torch.tensor([m]), torch.float32)
        cos_n, sin_n = rope(torch.tensor([n]), torch.float32)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), rtol=1e-4, atol=1e-4)
