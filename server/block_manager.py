"""Accounting of a replica's paged KV cache: which physical blocks each sequence holds, and
which full blocks hold a known prefix (automatic prefix caching).

The blocks themselves live on the shards; the gateway only hands out their ids, so a
cancelled or finished request frees its blocks at once, without asking the replica.

Prefix caching. A full block's content is named by a hash chained on the previous block's:
`block_hash(parent hash, the block's token ids)`. Equal hashes mean equal tokens at the same
positions from the start of the sequence, hence equal keys and values (a causal model's KV at a
position depends only on the tokens up to it). The scheduler registers a block's hash once a
chunk fills it; another sequence whose tokens start the same way then takes a reference on the
block instead of computing it again. A registered block whose last reference goes stays
findable in an LRU pool of evictable blocks; allocation takes never-registered free blocks
first, then evicts the least recently freed registered ones (forgetting their hash).

Only full blocks are registered, and a sequence shares only whole blocks at its start (the
match stops before its last token, which must be computed to sample). A sequence writes keys
and values only at positions from its `num_computed_tokens` on, past every block it shares, and a
registered block is full, so its owner never writes it again either: no one ever writes a
shared block, so no copy-on-write is needed. (A sequence that computes a block whose content is
already registered under another block keeps its own copy, unregistered.)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The chained content hash of a full block (parent: the previous block's hash; for the
    first, the request's cache salt, b"" when it has none, so that only requests with the same
    salt share blocks). SHA-256, so that no prompt can be crafted to collide with another's prefix."""
    return hashlib.sha256(parent + array("I", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        """Unreferenced blocks with no registered content."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Unreferenced registered blocks, least recently freed first."""
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (referenced), 0–1."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> list[int] | None:
        """Appends fresh blocks to block_ids until they hold num_tokens; returns the new ones.

        Returns None, changing nothing, when there are not enough free blocks.
        """
        missing = self.blocks_for(num_tokens) - len(block_ids)
        if missing <= 0:
            return []
        if missing > self.num_free:
            return None
        new = [self._allocate() for _ in range(missing)]
        block_ids.extend(new)
        return new

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference on each block and empties the list. A block left unreferenced
        becomes free, or evictable if registered: the list's last blocks first, so that a
        chain is evicted from its end (its start is what other sequences share)."""
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_ids.clear()

    def take_cached(self, block_ids: list[int], hashes: Sequence[bytes]) -> int:
        """Appends to block_ids the registered blocks of the longest run of hashes, from the
        first, that are all registered, taking a reference on each; returns how many."""
        count = 0
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            block_ids.append(block)
            count += 1
        return count

    def register(self, block: int, digest: bytes) -> None:
        """Names a held, full block's content, so others can share it. Does nothing when the
        block is already registered or another block holds the same content."""
        if block not in self._hash_of and digest not in self._block_of:
            self._hash_of[block] = digest
            self._block_of[digest] = block
