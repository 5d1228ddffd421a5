"""The engine: a queue, decode slots, and a loop that keeps every slot busy.

Continuous batching: up to `max_num_seqs` sequences decode together, one token each a step.
A request waits in the queue until a slot and enough cache blocks are free, is prefilled,
and joins the decode batch at the next step; it leaves the moment it stops, and the next
waiting request takes its slot. Nothing waits for the batch's slowest member.

Chunked prefill: a prompt is computed `prefill_chunk` tokens at a time, and the loop
alternates one chunk with one decode step, so a long prompt delays the running streams by one
chunk's time per token rather than by its whole prefill.

Blocks: a request is admitted only when the blocks its prompt and `max_tokens` can fill (up to
the context) are free or promised to nobody, less the blocks its prompt finds in the prefix
cache. Blocks are still taken one at a time as positions fill, but a running request can never
run out: when blocks are short, new requests wait, and nothing running is disturbed.

The loop runs on its own thread; `submit` and `abort` may be called from any thread, and each
request's `on_event` is called on the loop's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import threading
import time
import traceback

import numpy as np

from scaling.data.tokenizer import Tokenizer
from scaling.engine import programs as programs_lib
from scaling.engine import sampling
from scaling.engine.blocks import BlockPool
from scaling.engine.requests import Event, Request, TextStream, TokenLogprob
from scaling.engine.stats import Stats


class QueueFull(Exception):
    """More requests are waiting than `max_queue` allows."""


@dataclasses.dataclass
class Sequence:
    """A request in the engine: its tokens, its blocks and how far its keys are written."""

    request: Request
    tokens: list[int]
    need: int  # blocks it may fill, promised to it at admission
    blocks: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    hashed: int = 0  # leading blocks registered in the prefix cache
    last_key: bytes = b""
    cached_tokens: int = 0
    generated: int = 0
    text: TextStream | None = None
    last_token_time: float = 0.0

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.num_prompt


class Engine:
    """Serves many requests at once on one model; see the module docstring."""

    def __init__(self, programs: programs_lib.Programs, tokenizer: Tokenizer, max_queue: int):
        self.programs = programs
        self.layout = programs.layout
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.pool = BlockPool(self.layout.num_blocks, self.layout.block_size)
        self.stats = Stats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[str] = set()
        self._wake = threading.Condition()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []  # at most max_num_seqs, prefilling included
        self._promised = 0  # blocks promised to admitted sequences and not yet taken
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # --- the public side, any thread ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queues a request; raises `QueueFull` rather than letting the queue grow unbounded."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max_queue)")
            self._waiting.append(request)
            self.stats.requests_received += 1
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Stops a request (its client went away); its slot and blocks are freed."""
        with self._wake:
            self._aborted.add(request_id)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._aborted or self.running):
                    self._wake.wait()
                if self._stopping:
                    break
                aborted, self._aborted = self._aborted, set()
            try:
                self._drop_aborted(aborted)
                self._admit()
                if self._prefilling:
                    self._prefill_chunk()
                if self._decoding:
                    self._decode_step()
            except Exception:  # noqa: BLE001 - the server must outlive one bad step
                self._fail_running()

    def _fail_running(self) -> None:
        """Ends every running request with `error` after a step raised, so their clients
        get an answer and the slots and blocks are free for the next requests."""
        self.stats.step_errors += 1
        print(f"error: an engine step failed; its {self.running} requests end with "
              f"finish_reason=error\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        for seq in [*self._prefilling, *self._decoding]:
            if seq is not None:
                try:
                    self._finish(seq, "error")
                except Exception:  # noqa: BLE001 - a client callback may fail too
                    pass

    def _drop_aborted(self, aborted: set[str]) -> None:
        if not aborted:
            return
        with self._wake:
            kept = [r for r in self._waiting if r.request_id not in aborted]
            for request in self._waiting:
                if request.request_id in aborted:
                    request.on_event(Event(request.request_id, "", (), finish_reason="abort"))
            self._waiting = collections.deque(kept)
        for seq in [*self._prefilling, *self._decoding]:
            if seq.request.request_id in aborted:
                self._finish(seq, "abort")

    def _free_slots(self) -> int:
        return self.layout.max_num_seqs - len(self._decoding) - len(self._prefilling)

    def _admit(self) -> None:
        """Moves waiting requests, oldest first, into prefill while slots and blocks last."""
        P = self.layout.block_size
        while self._free_slots() > 0:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting[0]
            prompt = request.prompt_ids
            total = min(len(prompt) + request.params.max_tokens, self.layout.max_seq_len)
            need = math.ceil(total / P)
            blocks, key = self.pool.match_prefix(prompt, (len(prompt) - 1) // P)
            if self.pool.available - self._promised < need - len(blocks):
                self.pool.release(blocks)
                return  # the oldest waits for blocks; younger ones wait behind it
            with self._wake:
                self._waiting.popleft()
            seq = Sequence(request=request, tokens=list(prompt), need=need, blocks=blocks,
                           computed=len(blocks) * P, hashed=len(blocks), last_key=key,
                           cached_tokens=len(blocks) * P,
                           text=TextStream(self.tokenizer, request.params.stop))
            self._promised += need - len(blocks)
            self.stats.prompt_tokens += len(prompt)
            self.stats.cached_prompt_tokens += seq.cached_tokens
            self._prefilling.append(seq)

    def _grow(self, seq: Sequence, positions: int) -> None:
        """Takes blocks (promised at admission) until the sequence has room for `positions`."""
        while len(seq.blocks) * self.layout.block_size < positions:
            seq.blocks.append(self.pool.allocate())
            self._promised -= 1

    def _register_full_blocks(self, seq: Sequence) -> None:
        P = self.layout.block_size
        while seq.hashed < seq.computed // P:
            i = seq.hashed
            seq.last_key = self.pool.register(seq.blocks[i], seq.last_key,
                                              seq.tokens[i * P:(i + 1) * P])
            seq.hashed += 1

    def _row(self, seq: Sequence, start: int, end: int, width: int):
        """Positions, slots and block table of a sequence's tokens start..end-1."""
        P = self.layout.block_size
        positions = np.arange(start, end, dtype=np.int32)
        blocks = np.asarray(seq.blocks, np.int32)
        slots = blocks[positions // P] * P + positions % P
        table = np.zeros((width,), np.int32)
        table[:len(seq.blocks)] = seq.blocks
        return positions, slots, table

    def _settings(self, rows: list[Sequence | None]) -> sampling.RowSettings:
        settings = self.programs.greedy_settings(len(rows))
        for i, seq in enumerate(rows):
            if seq is None:
                continue
            params = seq.request.params
            settings.temperature_B[i] = params.temperature
            settings.top_k_B[i] = params.top_k
            settings.top_p_B[i] = params.top_p
            settings.seed_B[i] = params.seed % (1 << 32)
            settings.index_B[i] = seq.generated
        return settings

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest prompts, one per data-parallel row."""
        layout = self.layout
        rows: list[Sequence | None] = self._prefilling[:layout.prefill_rows]
        spans = [(s.computed, min(s.num_prompt, s.computed + layout.prefill_chunk))
                 for s in rows]
        length = programs_lib.bucket(max(end - start for start, end in spans),
                                     layout.prefill_lengths)
        for seq, (_, end) in zip(rows, spans, strict=True):
            self._grow(seq, end)
        width = programs_lib.bucket(max(len(s.blocks) for s in rows), layout.prefill_widths)
        rows += [None] * (layout.prefill_rows - len(rows))
        batch = self.programs.empty_batch(layout.prefill_rows, length, width)
        tokens = np.zeros((layout.prefill_rows, length), np.int32)
        for i, seq in enumerate(rows[:len(spans)]):
            start, end = spans[i]
            n = end - start
            positions, slots, table = self._row(seq, start, end, width)
            tokens[i, :n] = seq.tokens[start:end]
            batch.positions_BL[i, :n] = positions
            batch.positions_BL[i, n:] = end  # padding: written nowhere, read by nobody
            batch.slots_BL[i, :n] = slots
            batch.block_table_BM[i] = table
            batch.logit_index_B[i] = n - 1
        choice = self.programs.run(tokens, batch, self._settings(rows))
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(end - start for start, end in spans)
        for i, seq in enumerate(rows[:len(spans)]):
            seq.computed = spans[i][1]
            self._register_full_blocks(seq)
            if not seq.prefilling:
                self._prefilling.remove(seq)
                self._decoding.append(seq)
                self.stats.time_to_first_token.observe(time.monotonic() - seq.request.arrival)
                self._accept(seq, choice, i)

    def _decode_step(self) -> None:
        """One token for every decoding sequence. They sit in the first rows of the smallest
        compiled row count that holds them: a row is not tied to a sequence (the cache is
        reached through block tables), so a lone stream runs a one-row step."""
        layout = self.layout
        running = list(self._decoding)
        for seq in running:
            self._grow(seq, len(seq.tokens))
        width = programs_lib.bucket(max(len(s.blocks) for s in running), layout.decode_widths)
        num_rows = programs_lib.bucket(len(running), layout.decode_rows)
        rows: list[Sequence | None] = running + [None] * (num_rows - len(running))
        batch = self.programs.empty_batch(num_rows, 1, width)
        tokens = np.zeros((num_rows, 1), np.int32)
        for i, seq in enumerate(running):
            position = len(seq.tokens) - 1
            positions, slots, table = self._row(seq, position, position + 1, width)
            tokens[i, 0] = seq.tokens[-1]
            batch.positions_BL[i] = positions
            batch.slots_BL[i] = slots
            batch.block_table_BM[i] = table
        choice = self.programs.run(tokens, batch, self._settings(rows))
        self.steps += 1
        self.stats.decode_steps += 1
        for i, seq in enumerate(running):
            seq.computed = len(seq.tokens)
            self._register_full_blocks(seq)
            now = time.monotonic()
            self.stats.inter_token_latency.observe(now - seq.last_token_time)
            self._accept(seq, choice, i)

    def _accept(self, seq: Sequence, choice: sampling.Choice, row: int) -> None:
        """Takes a sequence's new token: its text, its stop conditions, its event."""
        params = seq.request.params
        token = int(choice.token_B[row])
        seq.generated += 1
        seq.last_token_time = time.monotonic()
        self.stats.completion_tokens += 1
        logprobs = ()
        if params.logprobs is not None:
            top = tuple((int(t), float(lp)) for t, lp in zip(
                choice.top_tokens_BT[row][:params.logprobs],
                choice.top_logprobs_BT[row][:params.logprobs], strict=True))
            logprobs = (TokenLogprob(token, float(choice.logprob_B[row]), top),)
        reason = None
        if token == self.tokenizer.eos_id and not params.ignore_eos:
            reason = "stop"
            token_ids: tuple[int, ...] = ()
        else:
            seq.tokens.append(token)
            token_ids = (token,)
            if seq.text.add(token):
                reason = "stop"
            elif seq.generated >= params.max_tokens or len(seq.tokens) >= self.layout.max_seq_len:
                reason = "length"
        if reason is None:
            seq.request.on_event(Event(seq.request.request_id, seq.text.take(final=False),
                                       token_ids, logprobs))
        else:
            self._finish(seq, reason, token_ids, logprobs)

    def _finish(self, seq: Sequence, reason: str, token_ids: tuple[int, ...] = (),
                logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._decoding:
            self._decoding.remove(seq)
        self.pool.release(seq.blocks)
        self._promised -= seq.need - len(seq.blocks)
        seq.blocks = []
        self.stats.requests_finished[reason] += 1
        seq.request.on_event(Event(
            seq.request.request_id, seq.text.take(final=True), token_ids, logprobs,
            finish_reason=reason, prompt_tokens=seq.num_prompt,
            completion_tokens=seq.generated, cached_tokens=seq.cached_tokens))
