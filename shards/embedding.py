"""Embedding forward: whole input sequences through the model, final hidden states pooled to one
vector each.

The inputs run as one packed batch of prefills from position 0, through the same paged
attention as generation: the gateway lends each input KV blocks for this forward only (and
frees them after), so the cache's memory accounting stays in one place. The final hidden
states are the model's output after its last norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.runner import ModelRunner


@dataclass(frozen=True)
class EmbedInput:
    token_ids: list[int]  # positions 0, 1, ...
    block_table: list[int]  # KV blocks covering len(token_ids) tokens
    last: bool  # pool the last token's state (else the mean over tokens)
    normalize: bool  # scale to unit L2 norm


def embed(runner: ModelRunner, inputs: list[EmbedInput]) -> torch.Tensor | None:
    """Pooled float32 vectors (len(inputs), hidden) of the inputs, computed in one forward (on
    the last pipeline stage; earlier stages return None)."""
    if not inputs:
        raise ValueError("an embedding batch needs at least one input")
    for number, item in enumerate(inputs):
        _check(runner, number, item)
    device = runner.device
    lengths = torch.tensor([len(item.token_ids) for item in inputs])  # (N,)
    input_ids = torch.tensor([t for item in inputs for t in item.token_ids], device=device)  # (T,)
    positions = torch.cat([torch.arange(len(item.token_ids)) for item in inputs]).to(device)  # (T,)
    metadata = AttentionMetadata.build(
        lengths.tolist(),
        [0] * len(inputs),
        [item.block_table for item in inputs],
        runner.kv_cache.block_size,
        device,
        runner.config.sliding_window,
    )
    with torch.inference_mode():
        hidden = runner.forward(input_ids, positions, metadata)  # (T, hidden)
        if hidden is None:
            return None
        hidden = hidden.float()
        owner = torch.repeat_interleave(torch.arange(len(inputs)), lengths).to(device)  # (T,) input of each row
        sums = hidden.new_zeros(len(inputs), hidden.shape[1]).index_add_(0, owner, hidden)  # (N, hidden)
        means = sums / lengths.to(device, torch.float32)[:, None]
        lasts = hidden[(torch.cumsum(lengths, 0) - 1).to(device)]  # (N, hidden)
        use_last = torch.tensor([item.last for item in inputs], device=device)[:, None]
        pooled = torch.where(use_last, lasts, means)
        normalize = torch.tensor([item.normalize for item in inputs], device=device)[:, None]
        return torch.where(normalize, F.normalize(pooled, dim=-1), pooled)


def _check(runner: ModelRunner, number: int, item: EmbedInput) -> None:
    """Rejects inputs that would index out of range (on a GPU that kills the process, not the call)."""
    config, cache = runner.config, runner.kv_cache
    n = len(item.token_ids)
    if not 1 <= n <= config.max_position_embeddings:
        raise ValueError(f"input {number}: {n} tokens, must be in [1, {config.max_position_embeddings}]")
    if min(item.token_ids) < 0 or max(item.token_ids) >= config.vocab_size:
        raise ValueError(f"input {number}: token id outside the vocabulary of {config.vocab_size}")
    blocks_needed = -(-n // cache.block_size)
    table = item.block_table[:blocks_needed]
    if len(table) < blocks_needed or not all(0 <= b < cache.num_blocks for b in table):
        raise ValueError(f"input {number}: block table must hold {blocks_needed} block ids below {cache.num_blocks}")
