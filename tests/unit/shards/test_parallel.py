"""Rank layout, pipeline partition, and whole-model tensor/pipeline parallelism without processes:
tensor-parallel ranks run as threads with real collectives between them; pipeline stages run one
after another, handing hidden states on."""

import threading

import pytest
import torch
from thread_tp import run_ranks

from shardgate.shards.kv_cache import KVCache
from shardgate.shards.parallel import ParallelConfig, ParallelState, TensorParallel, partition_layers
from shardgate.shards.runner import ModelRunner, SeqChunk
from shardgate.shards.sampler import SamplingParams
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
# accelerate's init_empty_weights patches torch.nn.Module for the whole process: rank threads
# must not load at the same time (real ranks are processes).
LOAD_LOCK = threading.Lock()
GREEDY = SamplingParams(seed=0, temperature=0.0)


@pytest.mark.parametrize(
    "layers, stages, expected",
    [
        (4, 1, [(0, 4)]),
        (4, 2, [(0, 2), (2, 4)]),
        (3, 2, [(0, 2), (2, 3)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (5, 5, [(i, i + 1) for i in range(5)]),
    ],
)
def test_partition_layers_covers_every_layer_once_evenly(layers, stages, expected):
    ranges = partition_layers(layers, stages)
    assert ranges == expected
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == layers


def test_partition_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        partition_layers(2, 3)


def test_rank_roles_follow_the_documented_layout():
    config = ParallelConfig(tp_size=2, pp_size=2)
    roles = []
    for rank in range(4):
        state = ParallelState(config, rank)
        roles.append((state.tp_rank, state.pp_stage, state.is_first_stage, state.is_last_stage, state.is_driver))
    assert roles == [(0, 0, True, False, True), (1, 0, True, False, False), (0, 1, False, True, False), (1, 1, False, True, False)]
    assert ParallelState(config, 1).next_rank == 3 and ParallelState(config, 3).prev_rank == 1
    assert ParallelState(config, 3).sampler_rank == 2


def test_single_rank_collectives_are_identities():
    single = TensorParallel()
    x = torch.randn(3, 4)
    assert single.all_reduce(x) is x and single.all_gather(x) is x


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_pipeline_stage_holds_about_half_the_weights(checkpoint):
    folder = str(checkpoint("llama"))  # untied, 3 layers: stages hold 2 and 1 layers + embedding / head
    whole = parameter_bytes(load_model(folder, torch.float32, CPU).model)
    config = ParallelConfig(pp_size=2)
    stages = [parameter_bytes(load_model(folder, torch.float32, CPU, ParallelState(config, rank)).model) for rank in range(2)]
    assert sum(stages) == whole
    assert all(0.3 * whole < stage < 0.7 * whole for stage in stages), (stages, whole)


def test_tensor_parallel_rank_holds_about_half_the_weights(checkpoint):
    folder = str(checkpoint("llama"))
    whole = parameter_bytes(load_model(folder, torch.float32, CPU).model)
    tp_ranks = run_ranks(2, lambda tp: tp)
    config = ParallelConfig(tp_size=2)
    for rank, tp in enumerate(tp_ranks):
        with LOAD_LOCK:
            share = parameter_bytes(load_model(folder, torch.float32, CPU, ParallelState(config, rank, tp)).model)
        assert 0.45 * whole < share < 0.55 * whole, (share, whole)  # only the norms are replicated


def greedy_tokens(folder: str, config: ParallelConfig, rank: int, tp: TensorParallel, steps: int, prompts):
    """Greedy generation on one rank of a replica; returns its sampled tokens per step."""
    parallel = ParallelState(config, rank, tp)
    with LOAD_LOCK:
        loaded = load_model(folder, torch.float32, CPU, parallel)
    kv = KVCache(loaded.model.kv_layout, 32, 4, torch.float32, CPU)
    runner = ModelRunner(loaded.model, loaded.config, kv, CPU)
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(len(prompts))]
    sequences = [list(p) for p in prompts]
    positions = [0] * len(prompts)
    for _ in range(steps):
        chunks = [SeqChunk(i, seq[pos:], pos, tables[i], True, GREEDY, 0) for i, (seq, pos) in enumerate(zip(sequences, positions))]
        results = runner.step(chunks)
        positions = [len(seq) for seq in sequences]
        for result in results:
            sequences[result.seq_id].append(result.token_id)
    return [seq[len(p) :] for seq, p in zip(sequences, prompts)]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_tensor_parallel_model_generates_like_one_rank(kind, checkpoint):
    # qwen2: one kv head shared by both ranks, odd vocabulary padded across ranks, tied head.
    folder = str(checkpoint(kind))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    single = greedy_tokens(folder, ParallelConfig(), 0, TensorParallel(), 6, prompts)
    ranks = run_ranks(2, lambda tp: greedy_tokens(folder, ParallelConfig(tp_size=2), tp.rank, tp, 6, prompts))
    assert ranks[0] == ranks[1] == single
