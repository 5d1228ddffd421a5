"""The paged KV cache's bookkeeping: which blocks are free, who holds them, what they hold.

The device pool (`scaling.models.paged`) is N blocks of P positions; this module decides
which block each sequence's positions go to. Blocks are handed out one at a time as a
sequence grows, so memory follows the tokens a sequence has, not the context it may reach.

Prefix caching: a block filled entirely with known tokens is registered under a key made
from its tokens and the key of the block before it, so the key names the whole prefix up to
the block's end. A new prompt walks its full blocks through that index and takes every block
already there, with a reference count, instead of computing it again. Full blocks are never
written again, so sharing them is safe. A block whose last holder has finished stays in the
index, free to be reused, until it is needed for something else (least recently freed first).
"""

from __future__ import annotations

import collections
import hashlib
import struct
from collections.abc import Sequence


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: its tokens and everything before them."""
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}i", *tokens),
                           digest_size=16).digest()


class BlockPool:
    """Allocation, reference counts and the prefix index of the cache's blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        # Blocks that nobody holds but that still hold a cached prefix, oldest first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.hits = 0  # prompt blocks found in the prefix cache
        self.peak_in_use = 0  # the most blocks held at once so far
        self.queries = 0  # prompt blocks looked up

    @property
    def available(self) -> int:
        """Blocks that `allocate` can hand out now (free ones and cached ones nobody holds)."""
        return len(self._free) + len(self._evictable)

    @property
    def in_use(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.available

    def allocate(self) -> int:
        """A block for new tokens: a never-cached one if any, else the oldest cached one."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            raise RuntimeError("no free KV cache block: the scheduler reserves them first")
        self._refs[block] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drops one hold on each block; a block nobody holds becomes free or evictable."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, tokens: Sequence[int], limit: int) -> tuple[list[int], bytes]:
        """The cached blocks that begin `tokens`, at most `limit` of them, now held by the
        caller, and the key of the last one (b"" when none)."""
        P = self.block_size
        blocks: list[int] = []
        key = b""
        for i in range(min(limit, len(tokens) // P)):
            self.queries += 1
            next_key = block_key(key, tokens[i * P:(i + 1) * P])
            block = self._block_of.get(next_key)
            if block is None:
                break
            self.hits += 1
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
            key = next_key
        return blocks, key

    def register(self, block: int, parent: bytes, tokens: Sequence[int]) -> bytes:
        """Records a block just filled with `tokens` after the prefix `parent`; returns its
        key. An identical block already cached keeps its place, and this one stays private."""
        key = block_key(parent, tokens)
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
        return key
