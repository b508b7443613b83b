"""The paged key/value cache: fixed-size blocks of token slots, shared by all sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What one rank caches per token: its layers (a pipeline stage's) and its kv heads (a
    tensor-parallel share)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across this rank's layers, keys and values."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size


class KVCache:
    """Per layer, keys and values of shape (num_blocks, block_size, num_kv_heads, head_dim).

    Token position p of a sequence lives in slot ``block_table[p // block_size] * block_size
    + p % block_size``. One allocation backs every layer. It starts zeroed, not
    empty: attention gathers padding slots under a mask, and a masked NaN
    would still poison the output (0 · NaN = NaN).

    With `padding_block`, one more block than asked for, `pad_block`, is never handed out: the
    padding rows of a compiled decode step (shards/compiled_step.py) write their keys and values
    there.
    """

    def __init__(
        self, layout: KVLayout, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device, padding_block: bool = False
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_block = num_blocks if padding_block else None
        """The spare block padding rows write to (no sequence's block table holds it); None without one."""
        storage = torch.zeros(
            2,
            layout.num_layers,
            num_blocks + padding_block,
            block_size,
            layout.num_kv_heads,
            layout.head_dim,
            dtype=dtype,
            device=device,
        )
        self.storage = storage
        """(2, layers, num_blocks (+ 1 with the padding block), block_size, kv_heads, head_dim): keys, then values."""
        self.nbytes = storage.nbytes
        """Bytes of the allocation behind every layer's keys and values."""
        self.keys: list[torch.Tensor] = list(storage[0].unbind(0))  # each (num_blocks, block_size, kv_heads, head_dim)
        self.values: list[torch.Tensor] = list(storage[1].unbind(0))
