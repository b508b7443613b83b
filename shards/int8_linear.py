"""Weight-only int8: a linear weight stored as int8 rows with one scale per output row.

Quantization is symmetric per output channel: ``scale[n] = max|W[n, :]| / 127`` (kept in the
model dtype, which ``torch._weight_int8pack_mm`` requires of its scales), and
``q[n, k] = round(W[n, k] / scale[n])`` in [-127, 127]; the weight is ``q · scale``.
Activations stay in the model dtype, so y = x (q · scale)ᵀ = (x qᵀ) · scale.

Two matmul paths, chosen per call by the number of rows M of x; both give x (q · scale)ᵀ.

- Up to INT8PACK_MAX_ROWS rows, ``torch._weight_int8pack_mm`` (CPU only) reads the int8
  weights as they are: half the bytes of bf16, which makes it faster than bf16 for a single row
  (a batch-1 decode is bound by the bytes it reads). It is a matrix-vector kernel whose cost
  grows with every row, so past INT8PACK_MAX_ROWS the next path is as fast or faster.
- Otherwise the int8 rows are converted to the model dtype into a scratch buffer (one per
  model, reused by every layer: it stays in cache), multiplied with F.linear, and the output
  columns scaled (q is an integer ≤ 127, exact in bf16, so nothing is lost before the
  scaling). The conversion is one more pass over the weights per step, so on this path int8 is
  slower than bf16, less so as M grows (prefill). Only weights larger than the scratch (the LM
  head) are converted in chunks, which bounds the scratch at SCRATCH_ELEMENTS.

Tried and dropped, each slower or no better: dequantizing into the scratch (multiplying by the
scale there: one more pass), chunking every weight's rows, and ``torch._int_mm`` (int8
activations too). The timings behind these choices are in the README's Performance section.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardgate.shards import cpu_kernels

INT8PACK_MAX_ROWS = 8
"""Largest M served by torch._weight_int8pack_mm; past it, converting to the model dtype and
using F.linear is as fast or faster (README, Performance)."""
SCRATCH_ELEMENTS = 1 << 22
"""Most weight elements converted at once on the other path (8 MiB in bf16)."""
_QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # rows quantized at once: bounds the float32 temporary


class Scratch:
    """One conversion buffer shared by all of a model's int8 weights (steps run one at a time)."""

    def __init__(self, elements: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.empty(elements, dtype=dtype, device=device)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of weight (N, K): (q int8 (N, K), scale (N,) in weight's dtype).

    The scale is rounded to the weight's dtype before q is computed, so q · scale is the
    nearest int8 grid point under the scale actually stored. An all-zero row gets the dtype's
    smallest normal scale and q = 0."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=weight.dtype, device=weight.device)
    tiny = torch.finfo(weight.dtype).tiny
    step = max(1, _QUANTIZE_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        block = weight[start : start + step].float()
        block_scale = (block.abs().amax(dim=1) / 127).clamp_min(tiny).to(weight.dtype)
        scale[start : start + step] = block_scale
        q[start : start + step] = (block / block_scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Weight(nn.Module):
    """A linear weight (out_features, in_features) held as int8 rows and per-row scales."""

    def __init__(self, weight: torch.Tensor, scratch: Scratch) -> None:
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.scratch = scratch

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: the int8 rows and their scales."""
        return self.qweight.nbytes + self.scale.nbytes

    def dequantize(self) -> torch.Tensor:
        """The weight this stands for, in the scales' dtype (for tests and checks)."""
        return (self.qweight.float() * self.scale.float()[:, None]).to(self.scale.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) @ weightᵀ (+ bias): (..., out), in x's dtype."""
        rows = x.numel() // x.shape[-1]
        if torch.compiler.is_compiling() and rows > INT8PACK_MAX_ROWS:
            # Inductor keeps an int8 weight's conversion out of constant folding and fuses it
            # into the matmul's input: no scratch buffer to mutate inside the graph.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        elif x.device.type == "cpu" and rows <= INT8PACK_MAX_ROWS:
            rows_of_x = x.reshape(rows, -1).contiguous()  # the kernel needs contiguous rows
            y = torch._weight_int8pack_mm(rows_of_x, self.qweight, self.scale).view(*x.shape[:-1], -1)
        else:
            y = self._converted_linear(x)
        return y if bias is None else y + bias

    def _converted_linear(self, x: torch.Tensor) -> torch.Tensor:
        out_features, in_features = self.qweight.shape
        chunk = max(1, min(out_features, self.scratch.buffer.numel() // in_features))
        if chunk == out_features:
            converted = self.scratch.buffer[: out_features * in_features].view(out_features, in_features)
            return F.linear(x, converted.copy_(self.qweight)) * self.scale
        y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
        for start in range(0, out_features, chunk):
            end = min(out_features, start + chunk)
            converted = self.scratch.buffer[: (end - start) * in_features].view(end - start, in_features)
            torch.mul(F.linear(x, converted.copy_(self.qweight[start:end])), self.scale[start:end], out=y[..., start:end])
        return y


def linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear for a dense weight or an Int8Weight. On a CPU with the decode kernels loaded
    (shards/cpu_kernels.py), a bfloat16 decode of one or two rows takes their GEMV, and one of up
    to PACKED_LINEAR_MAX_ROWS rows their packed GEMM, when the weight's packed copy is given."""
    if isinstance(weight, Int8Weight):
        return weight.linear(x, bias)
    if cpu_kernels.serves_linear(x, weight):
        y = cpu_kernels.decode_linear(x, weight)
    elif cpu_kernels.serves_packed(x, packed):
        y = cpu_kernels.packed_linear(x, packed, weight.shape[0])
    else:
        return F.linear(x, weight, bias)
    return y if bias is None else y + bias
