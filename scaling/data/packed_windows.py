"""Windows of a prepared corpus, read by random access, with their document boundaries.

A split of a prepared source is one token stream: its shards back to back, each document
[BOS] tokens EOS. Window i holds the seq_len + 1 tokens from i·seq_len, so every token is a
target once per epoch and any window is one or two record reads, whatever the corpus size.

With `data.packing="documents"` a window carries, beside its tokens, `segment_ids` (1 for
the document the window starts in, 2 for the next, ...; 0 for padding past the end) and
`positions` (each token's place in its document, from 0 at each document start, or at the
window start), so the model attends only within a document and restarts rotary positions.
Both follow from where the EOS ids fall, so the shards store token ids only. With
`packing="concat"` windows are plain token runs, documents flowing into each other.

The training order (`WindowOrder`) is a pure function of (seed, position): which source a
position of the global stream draws from, and which of its windows, computed for any position
without a permutation of the corpus in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

PACKINGS = ("documents", "concat")
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class TokenStream:
    """One split of one prepared source, as a random-access run of token ids."""

    def __init__(self, directory: Path, manifest: dict, split: str):
        import grain

        shards = manifest["splits"][split]["shards"]
        self.block = int(manifest["block_tokens"])
        self.dtype = np.dtype(manifest["dtype"])
        self.eos_id = int(manifest["tokenizer"]["eos_id"])
        tokens = np.array([s["tokens"] for s in shards], np.int64)
        records = np.array([s["records"] for s in shards], np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(tokens)])
        self.record_start = np.concatenate([[0], np.cumsum(records)])
        self.num_tokens = int(self.shard_start[-1])
        self._source = grain.sources.ArrayRecordDataSource(
            [str(Path(directory) / s["file"]) for s in shards])

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int32 tokens from each start; -1 past the end of the stream."""
        pieces = []   # (row, offset in the row, global record, first token in it, count)
        for row, start in enumerate(np.asarray(starts, np.int64)):
            position, stop = int(start), min(int(start) + length, self.num_tokens)
            while position < stop:
                shard = int(np.searchsorted(self.shard_start, position, side="right")) - 1
                local = position - int(self.shard_start[shard])
                record, offset = divmod(local, self.block)
                count = min(self.block - offset, stop - position,
                            int(self.shard_start[shard + 1]) - position)
                pieces.append((row, position - int(start),
                               int(self.record_start[shard]) + record, offset, count))
                position += count
        wanted = sorted({p[2] for p in pieces})
        blocks = dict(zip(wanted, self._source.__getitems__(wanted), strict=True))
        out = np.full((len(starts), length), -1, np.int32)
        for row, at, record, offset, count in pieces:
            block = np.frombuffer(blocks[record], self.dtype)
            out[row, at:at + count] = block[offset:offset + count]
        return out


def with_boundaries(tokens: np.ndarray, eos_id: int, packing: str) -> dict[str, np.ndarray]:
    """A batch of windows (-1 marks padding) as the model's inputs: tokens, and for
    `documents` packing their segment ids and in-document positions."""
    pad = tokens < 0
    batch = {"tokens": np.where(pad, 0, tokens).astype(np.int32)}
    if packing == "concat":
        return batch
    length = tokens.shape[1]
    starts = np.zeros(tokens.shape, bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    segments = np.cumsum(starts, axis=1, dtype=np.int32)
    index = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    batch["segment_ids"] = np.where(pad, 0, segments).astype(np.int32)
    batch["positions"] = np.where(pad, 0, index - last_start).astype(np.int32)
    return batch


@dataclasses.dataclass
class Windows:
    """The windows of one split: training windows, or evaluation windows whose targets cover
    the split once (the last one padded)."""
    stream: TokenStream
    seq_len: int
    packing: str
    evaluation: bool

    @property
    def num_windows(self) -> int:
        targets = self.stream.num_tokens - 1
        if self.evaluation:
            return -(-targets // self.seq_len)
        return max(targets // self.seq_len, 0)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        tokens = self.stream.read(np.asarray(indices, np.int64) * self.seq_len,
                                  self.seq_len + 1)
        batch = with_boundaries(tokens, self.stream.eos_id, self.packing)
        if self.evaluation:  # a target counts where it is real text
            batch["weights"] = (tokens[:, 1:] >= 0).astype(np.float32)
        return batch


def _seed32(*parts) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class WindowOrder:
    """Global stream position -> (source, window): a mixture by weight, each source in a
    fresh pseudo-random order every pass.

    The source of position g follows the golden-ratio sequence frac(g·φ + offset) against
    the cumulative weights: deterministic, and within 0.2 percentage points of the weights
    over any thousand consecutive positions (measured for three mixtures and five seeds).
    Within a source, position g takes window shuffle(g mod n, pass g div n), a keyed
    permutation computed per index (grain's `index_shuffle`), so no permutation of the corpus
    is ever held.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        total = float(sum(weights))
        self.cumulative = np.cumsum([w / total for w in weights])
        self.cumulative[-1] = 1.0
        self.sizes = sizes
        self.seed = seed
        self.offset = _seed32("mixture", seed) / 2**32

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from grain.experimental import index_shuffle

        positions = np.asarray(positions, np.int64)
        if len(self.sizes) == 1:
            sources = np.zeros(len(positions), np.int64)
        else:
            fraction = np.mod(positions.astype(np.float64) * GOLDEN + self.offset, 1.0)
            sources = np.searchsorted(self.cumulative, fraction, side="right")
        windows = np.empty(len(positions), np.int64)
        for i, (source, position) in enumerate(zip(sources, positions, strict=True)):
            size = self.sizes[source]
            epoch, index = divmod(int(position), size)
            windows[i] = index if size == 1 else index_shuffle(
                index=index, max_index=size - 1, seed=_seed32(self.seed, int(source), epoch),
                rounds=4)
        return sources, windows
