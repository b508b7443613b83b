"""The shard's embedding forward: transformers' final hidden states, pooled; the same alone or batched."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from shardgate.shards.embedding import EmbedInput, embed
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.runner import ModelRunner
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
INPUTS = [[5, 17, 42, 99, 7], [200, 3, 3, 8, 150, 61, 77, 12, 9, 240, 33], [120], [64, 65, 66, 67]]


def make_runner(source: str, num_blocks: int = 64) -> ModelRunner:
    loaded = load_model(source, torch.float32, CPU)
    return ModelRunner(loaded.model, loaded.config, KVCache(loaded.model.kv_layout, num_blocks, BLOCK_SIZE, torch.float32, CPU), CPU)


def lent_blocks(inputs: list[list[int]], first: int = 0) -> list[list[int]]:
    tables, next_block = [], first
    for tokens in inputs:
        count = -(-len(tokens) // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    return tables


def batch(inputs, last=False, normalize=False, first_block=0):
    return [EmbedInput(tokens, table, last, normalize) for tokens, table in zip(inputs, lent_blocks(inputs, first_block))]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_pooled_vectors_equal_transformers_hidden_states(checkpoint, kind):
    folder = checkpoint(kind)
    runner = make_runner(str(folder))
    means = embed(runner, batch(INPUTS))
    lasts = embed(runner, batch(INPUTS, last=True))
    reference = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for i, tokens in enumerate(INPUTS):
        with torch.no_grad():
            hidden = reference(torch.tensor([tokens])).last_hidden_state[0]  # (n, hidden), after the final norm
        torch.testing.assert_close(means[i], hidden.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lasts[i], hidden[-1], atol=1e-4, rtol=1e-4)


def test_batched_equals_alone_and_normalize_gives_unit_vectors():
    runner = make_runner("builtin:tiny")
    batched = embed(runner, batch(INPUTS, normalize=True))
    for i, tokens in enumerate(INPUTS):
        alone = embed(runner, batch([tokens], normalize=True, first_block=40))[0]
        assert (batched[i] - alone).abs().max().item() < 1e-5
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(INPUTS)))
    raw = embed(runner, batch(INPUTS))
    torch.testing.assert_close(F.normalize(raw, dim=-1), batched)
    assert batched.dtype == torch.float32 and batched.shape == (len(INPUTS), runner.config.hidden_size)


@pytest.mark.parametrize(
    "item, message",
    [
        (EmbedInput([], [0], False, False), "tokens"),
        (EmbedInput([1, 2, 3, 4, 5], [0], False, False), "block table"),
        (EmbedInput([1], [99], False, False), "block table"),
        (EmbedInput([258], [0], False, False), "vocabulary"),
    ],
)
def test_invalid_inputs_are_rejected(item, message):
    with pytest.raises(ValueError, match=message):
        embed(make_runner("builtin:tiny", num_blocks=8), [item])
