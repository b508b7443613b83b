"""Building blocks of a Llama-family decoder: norm, tensor-parallel linears, embedding, LM head, MLP.

Each layer with a sharded weight owns how a full checkpoint tensor is sliced
for its rank (``weight_loader(param, full_tensor)``). Sharded layers take
``tp_rank``/``tp_size``; the collectives that join the ranks' partial results
are not written yet: each class docstring says where its collective goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, full_tensor: torch.Tensor) -> None:
    """Copy a replicated tensor (same on every rank) into param, converting dtype and device."""
    _check_shape(full_tensor, tuple(param.shape))
    with torch.no_grad():
        param.copy_(full_tensor)


def _check_shape(tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"checkpoint tensor has shape {tuple(tensor.shape)}, expected {expected}")


def _copy_shard(param: nn.Parameter, full_tensor: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> None:
    """Copy this rank's equal slice along dim of a full tensor into param."""
    expected = list(param.shape)
    expected[dim] *= tp_size
    _check_shape(full_tensor, tuple(expected))
    shard = param.shape[dim]
    with torch.no_grad():
        param.copy_(full_tensor.narrow(dim, tp_rank * shard, shard))


def _check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel rank {tp_rank} of {tp_size}")


def _divide(total: int, tp_size: int, what: str) -> int:
    if total % tp_size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {tp_size}")
    return total // tp_size


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


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
    so no collective is needed after this layer.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        out_per_rank = _divide(out_features, tp_size, "output features")
        self.weight = _parameter(out_per_rank, in_features)
        self.bias = _parameter(out_per_rank) if bias else None

    def weight_loader(self, param: nn.Parameter, full_tensor: torch.Tensor) -> None:
        _copy_shard(param, full_tensor, 0, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r W_rᵀ with W split by input columns: rank r holds the slice x_r produced before it.

    Each rank computes a partial sum; with tp_size > 1 an all-reduce (sum)
    across ranks goes at the end of forward. No bias: none of the supported
    models has one on o_proj or down_proj.
    """

    def __init__(self, in_features: int, out_features: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = _parameter(out_features, _divide(in_features, tp_size, "input features"))

    def weight_loader(self, param: nn.Parameter, full_tensor: torch.Tensor) -> None:
        _copy_shard(param, full_tensor, 1, self.tp_rank, self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _VocabShard(nn.Module):
    """A (vocab, hidden) table split by vocabulary rows: ceil(V / tp_size) rows per rank.

    Rank r holds ids [vocab_start, vocab_end); the last rank's spare rows are zero.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        rows = -(-vocab_size // tp_size)
        self.vocab_start = min(tp_rank * rows, vocab_size)
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        self.weight = _parameter(rows, hidden_size)

    def weight_loader(self, param: nn.Parameter, full_tensor: torch.Tensor) -> None:
        _check_shape(full_tensor, (self.vocab_size, self.hidden_size))
        used = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param[:used].copy_(full_tensor[self.vocab_start : self.vocab_end])
            param[used:].zero_()


class VocabParallelEmbedding(_VocabShard):
    """e = E[id], with E split by vocabulary rows across ranks.

    A rank embeds only the ids in its range and gives zeros for the others;
    with tp_size > 1 an all-reduce (sum) across ranks goes at the end of forward.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(vocab_size, hidden_size, tp_rank, tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        return F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0)


class ParallelLMHead(_VocabShard):
    """logits = h Eᵀ, with E split by vocabulary rows exactly like VocabParallelEmbedding (so tying shares a shard).

    A rank returns the logits of its vocabulary range (spare rows give zeros);
    with tp_size > 1 an all-gather across ranks, cropped to vocab_size, goes after forward.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(vocab_size, hidden_size, tp_rank, tp_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class SwiGLUMLP(nn.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_rank=tp_rank, tp_size=tp_size)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp_rank=tp_rank, tp_size=tp_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp_rank=tp_rank, tp_size=tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
