import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardgate.shards.kv_cache import KVCache
from shardgate.shards.runner import ModelRunner, SampleResult, SeqChunk
from shardgate.shards.sampler import SamplingParams
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
GREEDY = SamplingParams(seed=0, temperature=0.0)
PROMPTS = [
    [5, 17, 42, 99, 7],
    [200, 3, 3, 8, 150, 61, 77, 12, 9, 240, 33, 18, 5, 91, 102, 6, 44, 250, 31],
    [120],
    [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74],
]


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    sampling: SamplingParams
    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    output: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def generate(
    runner: ModelRunner, sequences: list[Sequence], max_tokens: int, token_budget: int, rng: random.Random
) -> dict[int, list[int]]:
    """A minimal scheduler: decodes first, then prefill chunks up to a token budget per step, blocks
    handed out in random order. Returns each sequence's generated tokens."""
    free_blocks = list(range(runner.kv_cache.num_blocks))
    rng.shuffle(free_blocks)
    while any(len(seq.output) < max_tokens for seq in sequences):
        chunks, budget = [], token_budget
        running = [s for s in sequences if s.computed == len(s.tokens) - 1 and len(s.output) < max_tokens]
        prefilling = [s for s in sequences if s.computed < len(s.tokens) - 1]
        for seq in running + prefilling:
            size = min(budget, len(seq.tokens) - seq.computed)
            if size == 0:
                break
            budget -= size
            end = seq.computed + size
            while len(seq.block_table) * BLOCK_SIZE < end:
                seq.block_table.append(free_blocks.pop())
            chunks.append(
                SeqChunk(
                    seq_id=seq.seq_id,
                    token_ids=seq.tokens[seq.computed : end],
                    start_pos=seq.computed,
                    block_table=list(seq.block_table),
                    sample=end == len(seq.tokens),
                    sampling=seq.sampling,
                    output_index=len(seq.output),
                )
            )
            seq.computed = end
        rng.shuffle(chunks)  # results must follow chunk order, whatever it is
        results = runner.step(chunks)
        assert [r.seq_id for r in results] == [c.seq_id for c in chunks if c.sample]
        by_id = {seq.seq_id: seq for seq in sequences}
        for result in results:
            by_id[result.seq_id].output.append(result.token_id)
    return {seq.seq_id: seq.output for seq in sequences}


def make_runner(source: str, num_blocks: int = 64) -> ModelRunner:
    loaded = load_model(source, torch.float32, CPU)
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, BLOCK_SIZE, torch.float32, CPU)
    return ModelRunner(loaded.model, loaded.config, kv_cache, CPU)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_batched_chunked_greedy_generation_equals_transformers(checkpoint, kind):
    folder = checkpoint(kind)
    runner = make_runner(str(folder))
    sequences = [Sequence(i, prompt, GREEDY) for i, prompt in enumerate(PROMPTS)]
    ours = generate(runner, sequences, max_tokens=32, token_budget=8, rng=random.Random(kind))

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # always 32 tokens, as the runner does
    for i, prompt in enumerate(PROMPTS):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :]
        assert ours[i] == expected.tolist(), f"prompt {i}"


def test_seeded_sampling_does_not_depend_on_the_batch():
    sampling = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, top_k=50)
    alone = generate(make_runner("builtin:tiny"), [Sequence(0, PROMPTS[1], sampling)], 12, token_budget=64, rng=random.Random(0))[0]
    others = [Sequence(i, prompt, SamplingParams(seed=i, temperature=1.0)) for i, prompt in enumerate(PROMPTS[2:], 1)]
    batched = generate(
        make_runner("builtin:tiny"),
        [*others, Sequence(0, PROMPTS[1], sampling)],
        12,
        token_budget=5,  # and the prompt prefilled in chunks this time
        rng=random.Random(1),
    )[0]
    assert batched == alone
    other_seed = generate(
        make_runner("builtin:tiny"),
        [Sequence(0, PROMPTS[1], SamplingParams(seed=4321, temperature=0.9, top_p=0.95, top_k=50))],
        12,
        token_budget=64,
        rng=random.Random(0),
    )[0]
    assert other_seed != alone


def test_results_only_for_sampled_chunks_with_logprobs():
    runner = make_runner("builtin:tiny")
    with_logprobs = SamplingParams(seed=0, temperature=0.0, logprobs=True)
    results = runner.step(
        [
            SeqChunk(7, [256, 72, 105], 0, [0], sample=False, sampling=with_logprobs, output_index=0),
            SeqChunk(8, [256, 79], 0, [1], sample=True, sampling=with_logprobs, output_index=0),
        ]
    )
    assert len(results) == 1 and results[0].seq_id == 8
    assert results[0].logprob is not None and results[0].logprob < 0
    assert runner.step([]) == []

    # The first sequence continues from its cached chunk; its greedy token equals a one-shot prefill's.
    continued = runner.step([SeqChunk(7, [33], 3, [0], sample=True, sampling=GREEDY, output_index=0)])
    fresh = make_runner("builtin:tiny").step([SeqChunk(7, [256, 72, 105, 33], 0, [5], sample=True, sampling=GREEDY, output_index=0)])
    assert continued == [SampleResult(7, fresh[0].token_id, None)]


@pytest.mark.parametrize("suffix", [[33], [33, 90, 12]])
def test_a_chunk_reads_the_blocks_another_chunk_of_its_step_writes(suffix):
    # Prefix caching shares blocks within a step: the second sequence's first chunk starts after
    # a two-block prefix that the first sequence's chunk of the same step computes (placed
    # after it in the batch, and in another attention group when it is a single token).
    prefix = [256, 72, 105, 33, 40, 41, 42, 43]
    logprobs = SamplingParams(seed=0, temperature=0.0, logprobs=True)
    runner = make_runner("builtin:tiny")
    shared = runner.step(
        [
            SeqChunk(2, suffix, len(prefix), [0, 1, 3], sample=True, sampling=logprobs, output_index=0),
            SeqChunk(1, prefix + [50, 51], 0, [0, 1, 2], sample=True, sampling=logprobs, output_index=0),
        ]
    )
    alone = make_runner("builtin:tiny").step([SeqChunk(2, prefix + suffix, 0, [5, 6, 7], sample=True, sampling=logprobs, output_index=0)])
    assert shared[0].token_id == alone[0].token_id and shared[0].logprob == pytest.approx(alone[0].logprob, abs=1e-5)


@pytest.mark.parametrize(
    "chunk, message",
    [
        (SeqChunk(1, [], 0, [0], True, GREEDY, 0), "empty chunk"),
        (SeqChunk(1, [1, 2, 3, 4, 5], 0, [0], True, GREEDY, 0), "block table"),
        (SeqChunk(1, [1], 0, [99], True, GREEDY, 0), "block table"),
        (SeqChunk(1, [258], 0, [0], True, GREEDY, 0), "vocabulary"),
        (SeqChunk(1, [1], 2048, list(range(8)), True, GREEDY, 0), "max_position_embeddings"),
    ],
)
def test_invalid_chunks_are_rejected(chunk, message):
    with pytest.raises(ValueError, match=message):
        make_runner("builtin:tiny", num_blocks=8).step([chunk])
