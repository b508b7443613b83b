"""Layers, and tensor parallelism: with tp_size=2 (ranks as threads, real collectives between
them), every rank's output equals the unsharded layer's."""

import pytest
import torch
import torch.nn.functional as F
from thread_tp import run_ranks
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from shardgate.shards.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
    default_weight_loader,
)
from shardgate.shards.parallel import TensorParallel

TP = 2


def load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    for name, tensor in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = layer.get_submodule(module_name)
        getattr(module, "weight_loader", default_weight_loader)(getattr(module, attr), tensor)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    weight = 1 + 0.1 * torch.randn(48)
    x = (3 * torch.randn(5, 48)).to(dtype)
    ours = load(RMSNorm(48, eps=1e-5), {"weight": weight}).to(dtype)
    reference = LlamaRMSNorm(48, eps=1e-5)
    reference.weight.data.copy_(weight)
    torch.testing.assert_close(ours(x), reference.to(dtype)(x), rtol=0, atol=0)


def test_column_parallel_concatenates_to_full():
    weight, bias = torch.randn(12, 8), torch.randn(12)
    x = torch.randn(3, 8)
    full = load(ColumnParallelLinear(8, 12, bias=True), {"weight": weight, "bias": bias})
    torch.testing.assert_close(full(x), F.linear(x, weight, bias))
    ranks = [load(ColumnParallelLinear(8, 12, bias=True, tp=tp), {"weight": weight, "bias": bias}) for tp in run_ranks(TP, lambda tp: tp)]
    assert ranks[0].weight.shape == (6, 8)
    torch.testing.assert_close(torch.cat([rank(x) for rank in ranks], dim=-1), full(x))  # no collective: sharded output


def test_column_parallel_shared_shard_replicates_a_head():
    weight = torch.randn(4, 8)  # one kv head of size 4 shared by 2 ranks
    layers = [
        load(ColumnParallelLinear(8, 4, tp=tp, num_shards=1, shard_index=0), {"weight": weight}) for tp in run_ranks(TP, lambda tp: tp)
    ]
    assert all(torch.equal(layer.weight, weight) for layer in layers)


def test_row_parallel_sums_to_full():
    weight = torch.randn(8, 12)
    x = torch.randn(3, 12)
    full = load(RowParallelLinear(12, 8), {"weight": weight})
    torch.testing.assert_close(full(x), F.linear(x, weight))
    outputs = run_ranks(TP, lambda tp: load(RowParallelLinear(12, 8, tp=tp), {"weight": weight})(x.chunk(TP, -1)[tp.rank]))
    for output in outputs:  # the all-reduce gives every rank the whole sum
        torch.testing.assert_close(output, full(x))


def test_vocab_parallel_embedding_sums_to_full():
    table = torch.randn(301, 16)  # odd vocabulary: the last rank has a padding row
    ids = torch.tensor([0, 150, 151, 300, 7])
    full = load(VocabParallelEmbedding(301, 16), {"weight": table})
    torch.testing.assert_close(full(ids), table[ids])

    def rank(tp):
        layer = load(VocabParallelEmbedding(301, 16, tp=tp), {"weight": table})
        return layer, layer(ids)

    (first, out0), (second, out1) = run_ranks(TP, rank)
    assert [(r.vocab_start, r.vocab_end) for r in (first, second)] == [(0, 151), (151, 301)]
    assert second.weight[-1].abs().sum() == 0
    torch.testing.assert_close(out0, full(ids))
    torch.testing.assert_close(out1, full(ids))


def test_parallel_lm_head_gathers_to_full():
    table = torch.randn(301, 16)
    hidden = torch.randn(4, 16)
    full = load(ParallelLMHead(301, 16), {"weight": table})
    torch.testing.assert_close(full(hidden), hidden @ table.T)
    for logits in run_ranks(TP, lambda tp: load(ParallelLMHead(301, 16, tp=tp), {"weight": table})(hidden)):
        assert logits.shape == (4, 301)  # padding column cropped
        torch.testing.assert_close(logits, full(hidden))


def test_swiglu_mlp_tensor_parallel_sums_to_full():
    tensors = {
        "gate_proj.weight": torch.randn(24, 8),
        "up_proj.weight": torch.randn(24, 8),
        "down_proj.weight": torch.randn(8, 24),
    }
    x = torch.randn(3, 8)
    full = load(SwiGLUMLP(8, 24), tensors)
    expected = F.linear(F.silu(x @ tensors["gate_proj.weight"].T) * (x @ tensors["up_proj.weight"].T), tensors["down_proj.weight"])
    torch.testing.assert_close(full(x), expected)
    for output in run_ranks(TP, lambda tp: load(SwiGLUMLP(8, 24, tp=tp), tensors)(x)):
        torch.testing.assert_close(output, expected)


def test_weight_loaders_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"shape \(12, 9\), expected \(12, 8\)"):
        load(ColumnParallelLinear(8, 12, tp=run_ranks(TP, lambda tp: tp)[1]), {"weight": torch.randn(12, 9)})
    with pytest.raises(ValueError, match="expected"):
        load(RowParallelLinear(12, 8), {"weight": torch.randn(12, 8)})
    with pytest.raises(ValueError, match=r"expected \(301, 16\)"):
        load(VocabParallelEmbedding(301, 16), {"weight": torch.randn(300, 16)})
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        load(RMSNorm(16, eps=1e-6), {"weight": torch.randn(17)})


def test_tensor_parallel_size_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(8, 13, tp=run_ranks(TP, lambda tp: tp)[0])
    with pytest.raises(ValueError, match="rank"):
        TensorParallel(rank=2, size=2, group=object())
