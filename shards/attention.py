"""Paged causal attention in pure torch over a packed batch of sequence chunks.

A step packs T tokens from B sequences: each sequence contributes a chunk of
consecutive positions starting at its ``start_pos`` (a decode is a chunk of one
token; a long prompt may be prefilled in several chunks over several steps).
Each layer writes the chunk's keys and values into the paged cache, then every
query attends to its sequence's keys at positions 0..its own, read back from
the cache through the block table.

Keys are gathered by slot into a padded (sequences, context) batch and fed to
``scaled_dot_product_attention`` with a boolean mask. Padding costs
(sequences × longest query × longest context), so single-token chunks (decodes)
and longer chunks (prefills) are padded separately: one long prefill chunk
does not blow up the batch of decodes beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries are padded together into (num_seqs, max_query_len)."""

    token_index: torch.Tensor  # (n,) rows of the packed batch that belong to this group
    padded_index: torch.Tensor  # (n,) the same rows' places in the (num_seqs * max_query_len) padded layout
    context_slots: torch.Tensor  # (num_seqs, max_context) cache slot of each context position (padding: 0)
    mask: torch.Tensor  # (num_seqs, 1, max_query_len, max_context) bool, True = attend
    num_seqs: int
    max_query_len: int

    def to(self, device: torch.device) -> AttentionGroup:
        return replace(
            self,
            token_index=self.token_index.to(device),
            padded_index=self.padded_index.to(device),
            context_slots=self.context_slots.to(device),
            mask=self.mask.to(device),
        )


@dataclass(frozen=True)
class AttentionMetadata:
    """Index and mask tensors for one step, shared by every layer."""

    slot_mapping: torch.Tensor  # (T,) cache slot each packed token's key and value are written to
    groups: tuple[AttentionGroup, ...]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """Metadata for chunks packed in order: chunk i is query_lens[i] tokens at positions start_positions[i]...

        block_tables[i] must cover positions [0, start_positions[i] + query_lens[i]).
        """
        offsets = [0]
        for length in query_lens:
            offsets.append(offsets[-1] + length)
        slot_mapping = torch.empty(offsets[-1], dtype=torch.long)
        groups = []
        decodes = [i for i, length in enumerate(query_lens) if length == 1]
        prefills = [i for i, length in enumerate(query_lens) if length > 1]
        for members in (decodes, prefills):
            if members:
                group, new_slots = _build_group(
                    [offsets[i] for i in members],
                    [query_lens[i] for i in members],
                    [start_positions[i] for i in members],
                    [block_tables[i] for i in members],
                    block_size,
                    sliding_window,
                )
                slot_mapping[group.token_index] = new_slots
                groups.append(group)
        return cls(slot_mapping=slot_mapping.to(device), groups=tuple(group.to(device) for group in groups))


def _build_group(
    offsets: list[int],
    query_lens: list[int],
    starts: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
) -> tuple[AttentionGroup, torch.Tensor]:
    """One padded group on the CPU, and the cache slots of its new tokens (ordered as token_index)."""
    num_seqs = len(query_lens)
    max_query_len = max(query_lens)
    context_lens = [start + length for start, length in zip(starts, query_lens)]
    max_context = max(context_lens)
    max_blocks = -(-max_context // block_size)
    rows = [table[:max_blocks] for table in block_tables]
    tables = torch.tensor([row + [0] * (max_blocks - len(row)) for row in rows])  # (B, max_blocks)

    q_lens = torch.tensor(query_lens)  # (B,)
    q_starts = torch.tensor(starts)  # (B,)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # (n,)
    first_of_seq = torch.cumsum(q_lens, 0) - q_lens  # (B,)
    within = torch.arange(len(seq_of_token)) - first_of_seq[seq_of_token]  # (n,) index inside its chunk

    context_pos = torch.arange(max_context)  # (C,)
    context_slots = tables[:, context_pos // block_size] * block_size + context_pos % block_size  # (B, C)
    # Padded query rows repeat their sequence's last query, so no row is fully masked.
    query_pos = q_starts[:, None] + torch.minimum(torch.arange(max_query_len), q_lens[:, None] - 1)  # (B, Q)
    mask = context_pos <= query_pos[:, :, None]  # (B, Q, C)
    if sliding_window is not None:
        mask &= context_pos > query_pos[:, :, None] - sliding_window

    group = AttentionGroup(
        token_index=torch.tensor(offsets)[seq_of_token] + within,
        padded_index=seq_of_token * max_query_len + within,
        context_slots=context_slots,
        mask=mask[:, None],
        num_seqs=num_seqs,
        max_query_len=max_query_len,
    )
    return group, context_slots[seq_of_token, q_starts[seq_of_token] + within]


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
) -> torch.Tensor:
    """softmax(q kᵀ / √d + causal mask) v for each packed query over its sequence's cached keys.

    query (T, n_heads, head_dim); key, value (T, n_kv_heads, head_dim) for the new
    tokens, written into key_cache/value_cache (num_blocks, block_size, n_kv_heads,
    head_dim) first. Returns (T, n_heads, head_dim).
    """
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key.shape[1]
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)  # (slots, n_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    flat_keys.index_copy_(0, metadata.slot_mapping, key)
    flat_values.index_copy_(0, metadata.slot_mapping, value)

    output = torch.empty_like(query)
    for group in metadata.groups:
        padded = query.new_zeros(group.num_seqs * group.max_query_len, num_heads, head_dim)
        padded[group.padded_index] = query[group.token_index]
        q = padded.view(group.num_seqs, group.max_query_len, num_heads, head_dim).transpose(1, 2)  # (B, H, Q, D)
        k = flat_keys[group.context_slots].transpose(1, 2)  # (B, n_kv_heads, C, D)
        v = flat_values[group.context_slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=group.mask, enable_gqa=num_heads != num_kv_heads
        )  # (B, H, Q, D)
        attended = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)  # (B * Q, H, D)
        output[group.token_index] = attended[group.padded_index]
    return output
