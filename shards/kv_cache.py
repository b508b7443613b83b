"""The paged key/value cache: fixed-size blocks of token slots, shared by all sequences."""

from __future__ import annotations

import torch

from shardgate.shards.model_config import ModelConfig


class KVCache:
    """Per layer, keys and values of shape (num_blocks, block_size, num_kv_heads, head_dim).

    Token position p of a sequence lives in slot ``block_table[p // block_size] * block_size
    + p % block_size``. One allocation backs every layer. It starts zeroed, not
    empty: attention gathers padding slots under a mask, and a masked NaN
    would still poison the output (0 · NaN = NaN).
    """

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        storage = torch.zeros(
            2,
            config.num_hidden_layers,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )
        self.keys: list[torch.Tensor] = list(storage[0].unbind(0))  # each (num_blocks, block_size, kv_heads, head_dim)
        self.values: list[torch.Tensor] = list(storage[1].unbind(0))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, keys and values."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element_size
