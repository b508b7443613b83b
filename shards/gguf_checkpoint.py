"""A GGUF file as a checkpoint: its metadata as plain Python values, and its tensors under
Hugging Face names, dequantized lazily, one slice at a time.

A tensor is a ``TensorSource`` (shards/layers.py): ``narrow(dim, start, length)`` reads and
dequantizes only that slice, so a rank dequantizes only its own tensor-parallel part of the
tensors of its own pipeline stage. GGUF quantizes each row on its own, in blocks along the row:

- a slice of rows (dim 0: column-parallel linears, vocabulary shards) picks those rows' bytes
  and dequantizes them;
- a slice of columns (dim 1: row-parallel linears) picks each row's bytes for those columns when
  the slice starts and ends on block boundaries; otherwise it dequantizes the whole rows and
  slices the result.

Values are dequantized with the ``gguf`` package to float32; the weight loaders cast them to the
model dtype. llama.cpp's converter interleaves the two rotary halves of every query and key head
of a Llama model (``permute`` in convert_hf_to_gguf.py); reading undoes that, head by head.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

SUPPORTED_TENSOR_TYPES = tuple(
    GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
)

# GGUF tensor name (the part after ``blk.N.``) -> Hugging Face parameter name.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors a supported architecture may carry that this server cannot honour.
_UNSUPPORTED_TENSORS = {"rope_freqs.weight": "per-dimension rope frequency factors (rope_freqs.weight) are not supported"}


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message names the file and the problem."""


def hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a GGUF tensor (unknown names are kept as they are)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return gguf_name


class GGUFCheckpoint:
    """An open GGUF file (memory-mapped: tensors are read when sliced).

    Raises GGUFError when the file is not GGUF, is cut short or damaged (the reader checks every
    tensor's extent against the file), or holds a tensor of a type outside SUPPORTED_TENSOR_TYPES.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, TypeError, UnicodeDecodeError) as error:
            if str(error) == "GGUF magic invalid":
                raise GGUFError(f"{self.path}: not a GGUF file (it does not start with the GGUF magic number)") from None
            # Past the magic number the reader fails in many ways on a cut or damaged file.
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF file ({error})") from None
        self.metadata: dict[str, Any] = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        self._tensors: dict[str, ReaderTensor] = {}
        for tensor in reader.tensors:
            self._check_tensor(tensor)
            self._tensors[hf_name(tensor.name)] = tensor

    def _check_tensor(self, tensor: ReaderTensor) -> None:
        if tensor.name in _UNSUPPORTED_TENSORS:
            raise GGUFError(f"{self.path}: {_UNSUPPORTED_TENSORS[tensor.name]}")
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
            raise GGUFError(f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}; supported: {supported}")

    def tensor_names(self) -> list[str]:
        """The Hugging Face names of the tensors the file holds."""
        return list(self._tensors)

    def tensor(self, name: str, interleaved_heads: int | None = None) -> GGUFTensor:
        """The tensor of Hugging Face name ``name``; ``interleaved_heads``: the number of heads
        whose rotary halves llama.cpp interleaved (query and key weights of a Llama model)."""
        return GGUFTensor(self._tensors[name], interleaved_heads)


class GGUFTensor:
    """One GGUF tensor as a TensorSource: Hugging Face shape (rows, columns), float32 slices."""

    def __init__(self, tensor: ReaderTensor, interleaved_heads: int | None = None) -> None:
        self._type = tensor.tensor_type
        self._block_size, self._block_bytes = GGML_QUANT_SIZES[self._type]
        self.shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        # Bytes, one row per tensor row (a 1-D tensor is one row).
        self._rows = tensor.data.reshape(-1, tensor.data.shape[-1]).view(np.uint8)
        self._order = None if interleaved_heads is None else _deinterleave_order(self.shape[0], interleaved_heads)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if len(self.shape) == 1:
            return self._dequantize(self._rows)[0, start : start + length]
        if dim == 0:
            rows = self._order[start : start + length] if self._order is not None else slice(start, start + length)
            return self._dequantize(self._rows[rows])
        rows = self._rows[self._order] if self._order is not None else self._rows
        if start % self._block_size == 0 and length % self._block_size == 0:
            first = start // self._block_size * self._block_bytes
            return self._dequantize(rows[:, first : first + length // self._block_size * self._block_bytes])
        return self._dequantize(rows)[:, start : start + length]

    def _dequantize(self, raw: np.ndarray) -> torch.Tensor:
        values = dequantize(np.ascontiguousarray(raw), self._type)
        return torch.from_numpy(np.require(values, np.float32, "W"))  # a writable copy where the file is mapped read-only


def _deinterleave_order(rows: int, heads: int) -> np.ndarray:
    """For each Hugging Face row, the GGUF row holding it.

    Within a head of size d, llama.cpp stores Hugging Face row a·d/2 + b (half a, pair b) at
    row 2b + a."""
    head_dim = rows // heads
    return np.arange(rows).reshape(heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)
