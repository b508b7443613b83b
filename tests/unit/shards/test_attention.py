import random

import pytest
import torch
import torch.nn.functional as F

from shardgate.shards.attention import AttentionMetadata, paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 40


def dense_reference(q, k, v, sliding_window):
    """Causal (optionally banded) GQA attention of one whole sequence: q (L, H, D), k, v (L, KVH, D)."""
    length = q.shape[0]
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - sliding_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_chunked_paged_attention_equals_dense_causal(sliding_window):
    rng = random.Random(0)
    torch.manual_seed(0)
    lengths = [13, 1, 7, 22]
    seqs = [(torch.randn(n, HEADS, HEAD_DIM), torch.randn(n, KV_HEADS, HEAD_DIM), torch.randn(n, KV_HEADS, HEAD_DIM)) for n in lengths]
    free_blocks = list(range(NUM_BLOCKS))
    rng.shuffle(free_blocks)  # scattered, out-of-order physical blocks
    tables = [[free_blocks.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lengths]
    key_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    value_cache = torch.zeros_like(key_cache)

    done = [0] * len(lengths)
    outputs = [[] for _ in lengths]
    steps = 0
    while any(d < n for d, n in zip(done, lengths)):
        # Each step every unfinished sequence contributes a chunk of 1..6 tokens, in shuffled order.
        order = [i for i in range(len(lengths)) if done[i] < lengths[i]]
        rng.shuffle(order)
        chunks = [(i, min(rng.randint(1, 6), lengths[i] - done[i])) for i in order]
        metadata = AttentionMetadata.build(
            [size for _, size in chunks],
            [done[i] for i, _ in chunks],
            [tables[i] for i, _ in chunks],
            BLOCK_SIZE,
            torch.device("cpu"),
            sliding_window,
        )
        q, k, v = (torch.cat([seqs[i][part][done[i] : done[i] + size] for i, size in chunks]) for part in range(3))
        out = paged_attention(q, k, v, key_cache, value_cache, metadata)
        offset = 0
        for i, size in chunks:
            outputs[i].append(out[offset : offset + size])
            offset += size
            done[i] += size
        steps += 1
    assert steps > 3

    for (q, k, v), table, parts in zip(seqs, tables, outputs):
        torch.testing.assert_close(torch.cat(parts), dense_reference(q, k, v, sliding_window), rtol=1e-5, atol=1e-5)
        positions = torch.arange(q.shape[0])
        slots = torch.tensor(table)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        torch.testing.assert_close(key_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], k, rtol=0, atol=0)
        torch.testing.assert_close(value_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], v, rtol=0, atol=0)


def test_metadata_pads_decodes_and_prefills_separately():
    metadata = AttentionMetadata.build(
        query_lens=[1, 5, 1, 3],
        start_positions=[9, 0, 2, 4],
        block_tables=[[3, 1, 7], [0, 2], [5], [4, 6]],
        block_size=4,
        device=torch.device("cpu"),
    )
    decodes, prefills = metadata.groups
    assert (decodes.num_seqs, decodes.max_query_len) == (2, 1)
    assert decodes.token_index.tolist() == [0, 6]
    assert decodes.mask.shape == (2, 1, 1, 12)  # contexts of 10 and 3 tokens, in whole blocks of 4
    assert decodes.mask[1, 0, 0].tolist() == [True] * 3 + [False] * 9
    assert (prefills.num_seqs, prefills.max_query_len) == (2, 5)
    assert prefills.token_index.tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    assert prefills.padded_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # Position 9 of the first sequence is slot 7 * 4 + 1; the last chunk's positions 4..6 lie in block 6.
    assert metadata.slot_mapping.tolist() == [29, 0, 1, 2, 3, 8, 22, 24, 25, 26]
