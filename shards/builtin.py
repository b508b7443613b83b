"""``builtin:tiny``: a small Llama-shaped model made in memory, for running shardgate with no checkpoint.

Its weights are random but fixed (a seeded ``torch.Generator``), so every run
and every process gets the same model; its tokenizer is byte-level (256 byte
tokens plus ``<s>`` and ``</s>``), so any UTF-8 text encodes and decodes back.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from shardgate.proto.models import TINY
from shardgate.shards.model_config import ModelConfig

BUILTIN_NAME = TINY

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257
_SEED = 20240613
# Large enough that the next-token distribution is far from uniform.
_EMBEDDING_STD, _LINEAR_STD, _LM_HEAD_STD, _NORM_STD = 0.5, 0.1, 0.25, 0.1


def builtin_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=258,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
        model_type="llama",
        architecture="LlamaForCausalLM",
    )


def builtin_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full float32 checkpoint tensors, by Hugging Face name, drawn in a fixed order from a fixed seed."""
    generator = torch.Generator().manual_seed(_SEED)
    tensors = {}
    for name, shape in _checkpoint_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + _NORM_STD * noise
        elif name == "model.embed_tokens.weight":
            tensors[name] = _EMBEDDING_STD * noise
        elif name == "lm_head.weight":
            tensors[name] = _LM_HEAD_STD * noise
        else:
            tensors[name] = _LINEAR_STD * noise
    return tensors


def _checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (q_size, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_size, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_size, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_size),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (config.intermediate_size, hidden),
            f"{prefix}.mlp.up_proj.weight": (config.intermediate_size, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, config.intermediate_size),
        }
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def builtin_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: token i < 256 is byte i; ``<s>`` is prepended on encode, as Llama does."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in mapping]
    mapping |= {byte: chr(256 + n) for n, byte in enumerate(unprintable)}
    return dict(sorted(mapping.items()))
