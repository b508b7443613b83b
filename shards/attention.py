"""Paged causal attention in pure torch over a packed batch of sequence chunks.

A step packs T tokens from B sequences: each sequence contributes a chunk of
consecutive positions starting at its ``start_pos`` (a decode is a chunk of one
token; a long prompt may be prefilled in several chunks over several steps).
Each layer writes the chunk's keys and values into the paged cache, then every
query attends to its sequence's keys at positions 0..its own, read back from
the cache through the block table.

Reading the cache: each sequence's context is gathered block by block (one
contiguous block_size × kv_heads × head_dim copy per block, through a
(sequences, blocks) table built once per step) into a padded (sequences,
blocks × block_size) batch for ``scaled_dot_product_attention``, with a
boolean mask for causality, padding and any sliding window. Whole blocks are
gathered with index_select, one contiguous copy per block, rather than by
indexing slot by slot, which addresses every position on its own and was
measured slower (README, Performance); pure torch has no paged-attention kernel
that reads blocks in place.

Padding costs (sequences × longest query × longest context), so single-token
chunks (decodes) and longer chunks (prefills) are padded separately: one long
prefill chunk does not blow up the batch of decodes beside it. Decodes attend
with each kv head's query heads as its query rows (grouped-query attention as
a plain batched attention, no repeated keys).

Where the C++ paged decode kernel is loaded (shards/cpu_kernels.py, with
--compile on CPU), decodes skip the gather and SDPA: the kernel reads each
sequence's keys and values from their blocks in place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from shardgate.shards import cpu_kernels


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries are padded together into (num_seqs, max_query_len)."""

    token_index: torch.Tensor  # (n,) rows of the packed batch that belong to this group
    padded_index: torch.Tensor  # (n,) the same rows' places in the (num_seqs * max_query_len) padded layout
    block_tables: torch.Tensor  # (num_seqs, max_blocks) cache block of each context block (padding: 0)
    mask: torch.Tensor  # (num_seqs, 1, max_query_len, max_blocks * block_size) bool, True = attend
    context_lens: torch.Tensor  # (num_seqs,) int64: positions 0..len-1 of each sequence are in the cache after the write
    window: int
    """The sliding window (0: none): a query attends to the last `window` positions up to its own."""
    num_seqs: int
    max_query_len: int
    covers_batch: bool
    """The group is the whole packed batch, in order (a step of decodes only): no reindexing."""

    def to(self, device: torch.device) -> AttentionGroup:
        return replace(
            self,
            token_index=self.token_index.to(device),
            padded_index=self.padded_index.to(device),
            block_tables=self.block_tables.to(device),
            mask=self.mask.to(device),
            context_lens=self.context_lens.to(device),
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
                    covers_batch=len(members) == len(query_lens),
                )
                slot_mapping[group.token_index] = new_slots
                groups.append(group)
        return cls(slot_mapping=slot_mapping.to(device), groups=tuple(group.to(device) for group in groups))

    @classmethod
    def for_decodes(
        cls,
        slot_mapping: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        block_size: int,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """Metadata of a step of single-token chunks (decodes), built from tensors alone, so
        that a compiled step (shards/compiled_step.py) traces it: slot_mapping, positions (B,),
        block_tables (B, max_blocks). The same group `build` makes for such a step."""
        context_pos = torch.arange(block_tables.shape[1] * block_size, device=positions.device)  # (C,)
        mask = context_pos <= positions[:, None]  # (B, C)
        if sliding_window is not None:
            mask &= context_pos > positions[:, None] - sliding_window
        rows = torch.arange(positions.shape[0], device=positions.device)
        group = AttentionGroup(
            token_index=rows,
            padded_index=rows,
            block_tables=block_tables,
            mask=mask[:, None, None, :],
            context_lens=positions + 1,
            window=sliding_window or 0,
            num_seqs=positions.shape[0],
            max_query_len=1,
            covers_batch=True,
        )
        return cls(slot_mapping=slot_mapping, groups=(group,))


def _build_group(
    offsets: list[int],
    query_lens: list[int],
    starts: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
    covers_batch: bool,
) -> tuple[AttentionGroup, torch.Tensor]:
    """One padded group on the CPU, and the cache slots of its new tokens (ordered as token_index)."""
    num_seqs = len(query_lens)
    max_query_len = max(query_lens)
    max_context = max(start + length for start, length in zip(starts, query_lens))
    max_blocks = -(-max_context // block_size)
    rows = [table[:max_blocks] for table in block_tables]
    tables = torch.tensor([row + [0] * (max_blocks - len(row)) for row in rows])  # (B, max_blocks)

    q_lens = torch.tensor(query_lens)  # (B,)
    q_starts = torch.tensor(starts)  # (B,)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # (n,)
    first_of_seq = torch.cumsum(q_lens, 0) - q_lens  # (B,)
    within = torch.arange(len(seq_of_token)) - first_of_seq[seq_of_token]  # (n,) index inside its chunk

    context_pos = torch.arange(max_blocks * block_size)  # (C,) positions the gathered blocks hold
    # Padded query rows repeat their sequence's last query, so no row is fully masked.
    query_pos = q_starts[:, None] + torch.minimum(torch.arange(max_query_len), q_lens[:, None] - 1)  # (B, Q)
    mask = context_pos <= query_pos[:, :, None]  # (B, Q, C)
    if sliding_window is not None:
        mask &= context_pos > query_pos[:, :, None] - sliding_window

    new_pos = q_starts[seq_of_token] + within  # (n,) positions of the group's new tokens
    group = AttentionGroup(
        token_index=torch.tensor(offsets)[seq_of_token] + within,
        padded_index=seq_of_token * max_query_len + within,
        block_tables=tables,
        mask=mask[:, None],
        context_lens=q_starts + q_lens,
        window=sliding_window or 0,
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        covers_batch=covers_batch and max_query_len == 1,
    )
    return group, tables[seq_of_token, new_pos // block_size] * block_size + new_pos % block_size


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
    if torch.compiler.is_compiling():  # a compiled decode step (AttentionMetadata.for_decodes)
        (group,) = metadata.groups
        if _kernel_serves(query):  # the cache write and attention in one C++ call
            return cpu_kernels.decode_step(
                query, key, value, key_cache, value_cache, metadata.slot_mapping, group.block_tables, group.context_lens, group.window
            )
        return paged_decode_attention(query, key, value, key_cache, value_cache, metadata.slot_mapping, group.block_tables, group.mask)
    _write(key, value, key_cache, value_cache, metadata.slot_mapping)
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key.shape[1]

    output = None if len(metadata.groups) == 1 and metadata.groups[0].covers_batch else torch.empty_like(query)
    for group in metadata.groups:
        num_seqs = group.num_seqs
        if group.max_query_len == 1:
            decodes = query if group.covers_batch else query[group.token_index]
            attended = _attend_decodes(decodes, key_cache, value_cache, group.block_tables, group.mask, group.context_lens, group.window)
            if output is None:
                return attended
            output[group.token_index] = attended
            continue
        k, v = _gather(key_cache, value_cache, group.block_tables)  # (B, kv, C, D) each
        padded = query.new_zeros(num_seqs * group.max_query_len, num_heads, head_dim)
        padded[group.padded_index] = query[group.token_index]
        q = padded.view(num_seqs, group.max_query_len, num_heads, head_dim).transpose(1, 2)  # (B, H, Q, D)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, enable_gqa=num_heads != num_kv_heads)  # (B, H, Q, D)
        attended = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)  # (B * Q, H, D)
        output[group.token_index] = attended[group.padded_index]
    return output


def _write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """The new tokens' keys and values (T, kv, D) into their cache slots (T,)."""
    num_kv_heads, head_dim = key.shape[1:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)


def _gather(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's context blocks, whole: keys and values (B, kv, C, D), C = blocks × block_size."""
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    blocks = block_tables.view(-1)  # index_select copies whole blocks: faster than advanced indexing
    k = key_cache.index_select(0, blocks).view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    v = value_cache.index_select(0, blocks).view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
    return k, v


def _attend_decodes(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    context_lens: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Single-token queries (B, H, D) over their cached context: through the paged kernel when it
    is loaded, else by gathering the blocks for SDPA."""
    if _kernel_serves(query):
        return cpu_kernels.attend(query, key_cache, value_cache, block_tables, context_lens, window)
    k, v = _gather(key_cache, value_cache, block_tables)
    return _decode(query, k, v, mask)


def _kernel_serves(query: torch.Tensor) -> bool:
    """Whether decodes of this query go through the C++ paged kernel (loaded, and a CPU tensor)."""
    return cpu_kernels.loaded() and query.device.type == "cpu"


def _decode(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Single-token queries (B, H, D) over their gathered context (B, kv, C, D): each kv head's
    query heads become its query rows (grouped-query attention as a plain batched attention)."""
    num_seqs, num_heads, head_dim = query.shape
    q = query.reshape(num_seqs, k.shape[1], -1, head_dim)  # (B, kv, heads per kv head, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(num_seqs, num_heads, head_dim)


@torch.library.custom_op("shardgate::paged_decode_attention", mutates_args=("key_cache", "value_cache"))
def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """paged_attention of a step of decodes (mask (B, 1, 1, C)) without the paged kernel, as one operator that a compiled
    graph calls between its fused kernels. Traced into the graph, the cache write and the gathers
    become whole-cache updates that the compiler fuses into its attention kernel, which then
    scans the whole cache every layer (measured on builtin:tiny with a 64 MiB cache: 650 ms a
    step against 2.4 ms eager); as an opaque operator they stay the eager step's in-place writes
    and block copies."""
    _write(key, value, key_cache, value_cache, slot_mapping)
    k, v = _gather(key_cache, value_cache, block_tables)
    return _decode(query, k, v, mask)


@paged_decode_attention.register_fake
def _(query, key, value, key_cache, value_cache, slot_mapping, block_tables, mask) -> torch.Tensor:
    return torch.empty_like(query)
