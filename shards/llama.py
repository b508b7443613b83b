"""The Llama-family decoder (Llama, Mistral, Qwen2) over a packed batch of tokens and a paged KV cache.

Parameter names match Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``, ...), so loading is a direct name match.
"""

from __future__ import annotations

import torch
from torch import nn

from shardgate.shards.attention import AttentionMetadata, paged_attention
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
)
from shardgate.shards.model_config import ModelConfig
from shardgate.shards.rope import RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    """o = W_o · attention(rope(W_q x), rope(W_k x), W_v x), grouped-query, over the paged cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, -1, self.head_dim)  # (T, n_heads, head_dim)
        k = self.k_proj(hidden).view(num_tokens, -1, self.head_dim)  # (T, n_kv_heads, head_dim)
        v = self.v_proj(hidden).view(num_tokens, -1, self.head_dim)  # (T, n_kv_heads, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attended = paged_attention(q, k, v, key_cache, value_cache, metadata)  # (T, n_heads, head_dim)
        return self.o_proj(attended.reshape(num_tokens, -1))


class LlamaDecoderLayer(nn.Module):
    """h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, metadata, key_cache, value_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (the checkpoint's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """Next-token model: hidden states for packed tokens, logits for the rows asked for."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (call again after replacing it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """Final hidden states (T, hidden) for input_ids and positions (T,)."""
        hidden = self.model.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.model.rotary_emb(positions, hidden.dtype)  # (T, head_dim) each
        for layer, key_cache, value_cache in zip(self.model.layers, kv_cache.keys, kv_cache.values):
            hidden = layer(hidden, cos, sin, attn_metadata, key_cache, value_cache)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, vocab) for hidden states (N, hidden)."""
        return self.lm_head(hidden).float()
