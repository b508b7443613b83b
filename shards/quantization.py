"""``--quantize``: which weights become int8 after loading, and the bytes a step reads.

Quantized: the linears of every layer (q/k/v/o_proj, gate/up/down_proj) and the LM head, each
rank its own tensor-parallel slice, so per-channel scales stay local and the collectives are
unchanged (a column-parallel rank's rows are whole output channels; a row-parallel rank
quantizes its columns' slice of every row, scaled by that slice's own maximum). Not quantized:
the embedding table (rows are gathered, not multiplied) and the norms. With tied embeddings
the LM head gets its own int8 copy and the embedding keeps the dense table.

The full-precision model is loaded first and then converted, so loading peaks at the dense size.
"""

from __future__ import annotations

from torch import nn

from shardgate.proto.common import QUANTIZATIONS
from shardgate.shards.int8_linear import SCRATCH_ELEMENTS, Int8Weight, Scratch
from shardgate.shards.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

_QUANTIZED_LAYERS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)


def quantize_model(model: nn.Module, method: str) -> None:
    """Convert this rank's linear and LM-head weights in place ("none" leaves the model as it is)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {method!r}")
    if method == "none":
        return
    layers = [module for module in model.modules() if isinstance(module, _QUANTIZED_LAYERS)]
    if not layers:
        return
    weights = [layer.weight for layer in layers]
    largest = max(w.numel() for w in weights)
    widest = max(w.shape[1] for w in weights)
    scratch = Scratch(max(min(largest, SCRATCH_ELEMENTS), widest), weights[0].dtype, weights[0].device)
    for layer in layers:
        dense = layer.weight
        del layer.weight  # a tied LM head drops only its own reference: the embedding keeps the table
        layer.weight = Int8Weight(dense, scratch)


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step reads on this rank: every parameter (int8 rows and
    scales where quantized) except the input embedding table, whose rows are gathered rather
    than read whole. A tied LM head counts (it reads the whole table)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            continue
        tensors = [module.qweight, module.scale] if isinstance(module, Int8Weight) else list(module.parameters(recurse=False))
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.nbytes
    return total
