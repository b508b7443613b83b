"""Accounting of a replica's paged KV cache: which physical blocks each sequence holds.

The blocks themselves live on the shards; the gateway only hands out their ids, so a
cancelled or finished request frees its blocks at once, without asking the replica.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0–1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> list[int] | None:
        """Appends blocks to block_ids until they hold num_tokens; returns the new ones.

        Returns None, changing nothing, when there are not enough free blocks.
        """
        missing = self.blocks_for(num_tokens) - len(block_ids)
        if missing <= 0:
            return []
        if missing > len(self._free):
            return None
        new = [self._free.popleft() for _ in range(missing)]
        block_ids.extend(new)
        return new

    def free(self, block_ids: list[int]) -> None:
        """Returns the blocks to the pool and empties the list."""
        self._free.extend(block_ids)
        block_ids.clear()
