"""The Llama-family decoder (Llama, Mistral, Qwen2) over a packed batch of tokens and a paged KV cache.

Parameter names match Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``, ...), so loading is a direct name match.
"""

from __future__ import annotations

import torch
from torch import nn

from shardgate.shards.attention import AttentionMetadata, paged_attention
from shardgate.shards.kv_cache import KVCache, KVLayout
from shardgate.shards.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
)
from shardgate.shards.model_config import ModelConfig
from shardgate.shards.parallel import ParallelConfig, ParallelState, TensorParallel
from shardgate.shards.rope import RotaryEmbedding, apply_rotary


def kv_heads_per_rank(config: ModelConfig, tp_size: int) -> int:
    """Key/value heads each rank holds: an even split, or one shared head when there are fewer
    heads than ranks (then tp_size / kv_heads ranks hold a copy of each)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"{heads} attention heads cannot be split over tensor-parallel size {tp_size}")
    if kv_heads >= tp_size:
        if kv_heads % tp_size:
            raise ValueError(f"{kv_heads} key/value heads cannot be split over tensor-parallel size {tp_size}")
        return kv_heads // tp_size
    if tp_size % kv_heads:
        raise ValueError(f"tensor-parallel size {tp_size} is not a multiple of the {kv_heads} key/value heads")
    return 1


class LlamaAttention(nn.Module):
    """o = W_o · attention(rope(W_q x), rope(W_k x), W_v x), grouped-query, over the paged cache.

    Heads are split across tensor-parallel ranks; o_proj's all-reduce joins them."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        local_kv = kv_heads_per_rank(config, tp.size)
        # With fewer kv heads than ranks, rank r's query heads all belong to kv head r·kv/tp.
        kv_split = dict(num_shards=kv_heads, shard_index=tp.rank * kv_heads // tp.size) if local_kv * tp.size > kv_heads else {}
        self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, bias=config.attention_bias, tp=tp)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=config.attention_bias, tp=tp, **kv_split)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=config.attention_bias, tp=tp, **kv_split)
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, tp=tp)

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

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, tp)

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
    """Embedding, decoder layers and final norm (the checkpoint's ``model.`` prefix).

    A pipeline stage holds only its own layers, keyed by their global index so parameter names
    stay the checkpoint's; the embedding lives on the first stage, the norm on the last."""

    def __init__(self, config: ModelConfig, parallel: ParallelState) -> None:
        super().__init__()
        start, end = parallel.layer_range(config.num_hidden_layers)
        tp = parallel.tp
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp) if parallel.is_first_stage else None
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config, tp) for i in range(start, end)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage else None
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """Next-token model (or one pipeline stage of it): hidden states for packed tokens, logits
    for the rows asked for."""

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None) -> None:
        super().__init__()
        parallel = parallel or ParallelState(ParallelConfig())
        self.config = config
        self.parallel = parallel
        self.model = LlamaModel(config, parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel.tp) if parallel.is_last_stage else None
        self.kv_layout = KVLayout(len(self.model.layers), kv_heads_per_rank(config, parallel.tp.size), config.head_dim)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them and both live on this
        rank (call again after replacing it); a last stage without the embedding loads its own copy."""
        if self.config.tie_word_embeddings and self.model.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_cache: KVCache,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (T, hidden) for input_ids and positions (T,).

        The first stage embeds input_ids; a later stage continues from the previous stage's
        `hidden`. The last stage returns them normed, ready for compute_logits."""
        if self.model.embed_tokens is not None:
            hidden = self.model.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.model.rotary_emb(positions, hidden.dtype)  # (T, head_dim) each
        for layer, key_cache, value_cache in zip(self.model.layers.values(), kv_cache.keys, kv_cache.values):
            hidden = layer(hidden, cos, sin, attn_metadata, key_cache, value_cache)
        return self.model.norm(hidden) if self.model.norm is not None else hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) for hidden states (N, hidden), in the model's dtype (the sampler
        widens the rows it must); last stage only."""
        return self.lm_head(hidden)
