"""Building blocks of a Llama-family decoder: norm, tensor-parallel linears, embedding, LM head, MLP.

Each layer with a sharded weight owns how a checkpoint tensor is sliced for its rank
(``weight_loader(param, source)``) and the collective that joins the ranks' partial results.
A ``source`` is anything with ``shape`` and ``narrow(dim, start, length)``: a tensor, or a lazy
safetensors slice, so a rank reads only its own part of the file.

After loading, ``--quantize int8`` replaces the ``weight`` of the linears and the LM head with
an ``Int8Weight`` (shards/quantization.py); their forwards call ``linear``, which takes either.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shardgate.shards import cpu_kernels
from shardgate.shards.int8_linear import linear
from shardgate.shards.parallel import SINGLE, TensorParallel


class TensorSource(Protocol):
    """A checkpoint tensor that may not be in memory yet."""

    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def default_weight_loader(param: nn.Parameter, source: TensorSource) -> None:
    """Copy a replicated tensor (same on every rank) into param, converting dtype and device."""
    _check_shape(source, tuple(param.shape))
    with torch.no_grad():
        param.copy_(source.narrow(0, 0, param.shape[0]))


def _check_shape(source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != expected:
        raise ValueError(f"checkpoint tensor has shape {tuple(source.shape)}, expected {expected}")


def _copy_shard(param: nn.Parameter, source: TensorSource, dim: int, index: int, count: int) -> None:
    """Copy slice `index` of `count` equal slices along dim of a checkpoint tensor into param."""
    expected = list(param.shape)
    expected[dim] *= count
    _check_shape(source, tuple(expected))
    shard = param.shape[dim]
    with torch.no_grad():
        param.copy_(source.narrow(dim, index * shard, shard))


def _divide(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {tp_size}")
    return total // tp_size


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _add_packed_weight(module: nn.Module) -> None:
    """The linear's `packed_weight` buffer: None until pack_linear_weights fills it."""
    module.register_buffer("packed_weight", None, persistent=False)


def pack_linear_weights(model: nn.Module) -> int:
    """Gives every dense linear weight of model the packed copy that the CPU kernels' packed GEMM
    reads (shards/cpu_kernels.py; none where it cannot serve, as for int8 weights). Returns the
    bytes the copies take."""
    total = 0
    for module in model.modules():
        if hasattr(module, "packed_weight") and isinstance(module.weight, torch.Tensor):
            module.packed_weight = cpu_kernels.pack_weight(module.weight)
            total += 0 if module.packed_weight is None else module.packed_weight.nbytes
    return total


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in float32 and cast back before scaling, as transformers does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _parameter(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W (and b) split by output rows: rank r computes its slice of y.

    The output stays sharded. Its consumers (attention heads, the MLP's
    intermediate features) work rank-locally and end in a RowParallelLinear,
    so no collective is needed after this layer. ``num_shards``/``shard_index``
    override the split for key/value heads fewer than the ranks: then ranks
    share (replicate) a head.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        num_shards: int | None = None,
        shard_index: int | None = None,
    ) -> None:
        super().__init__()
        self.num_shards = tp.size if num_shards is None else num_shards
        self.shard_index = tp.rank if shard_index is None else shard_index
        out_per_rank = _divide(out_features, self.num_shards, "output features")
        self.weight = _parameter(out_per_rank, in_features)
        self.bias = _parameter(out_per_rank) if bias else None
        _add_packed_weight(self)

    def weight_loader(self, param: nn.Parameter, source: TensorSource) -> None:
        _copy_shard(param, source, 0, self.shard_index, self.num_shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r W_rᵀ with W split by input columns: rank r holds the slice x_r produced before it.

    Each rank computes a partial sum; an all-reduce (sum) across ranks ends
    forward. No bias: none of the supported models has one on o_proj or
    down_proj (a bias would be added once, after the all-reduce).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _parameter(out_features, _divide(in_features, tp.size, "input features"))
        _add_packed_weight(self)

    def weight_loader(self, param: nn.Parameter, source: TensorSource) -> None:
        _copy_shard(param, source, 1, self.tp.rank, self.tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight, packed=self.packed_weight))


class _VocabShard(nn.Module):
    """A (vocab, hidden) table split by vocabulary rows: ceil(V / tp_size) rows per rank.

    Rank r holds ids [vocab_start, vocab_end); the last rank's spare (padding) rows are zero.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp = tp
        rows = -(-vocab_size // tp.size)
        self.vocab_start = min(tp.rank * rows, vocab_size)
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        self.weight = _parameter(rows, hidden_size)

    def weight_loader(self, param: nn.Parameter, source: TensorSource) -> None:
        _check_shape(source, (self.vocab_size, self.hidden_size))
        used = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param[:used].copy_(source.narrow(0, self.vocab_start, used))
            param[used:].zero_()


class VocabParallelEmbedding(_VocabShard):
    """e = E[id], with E split by vocabulary rows across ranks.

    A rank embeds only the ids in its range and gives zeros for the others;
    an all-reduce (sum) across ranks ends forward.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        return self.tp.all_reduce(F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0))


class ParallelLMHead(_VocabShard):
    """logits = h Eᵀ, with E split by vocabulary rows exactly like VocabParallelEmbedding (so tying shares a shard).

    Each rank computes the logits of its vocabulary range; an all-gather joins
    them and the padding columns are cropped, so every rank gets all (N, vocab) logits.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        _add_packed_weight(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(linear(hidden, self.weight, packed=self.packed_weight))[..., : self.vocab_size]


class SwiGLUMLP(nn.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp=tp)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp=tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
