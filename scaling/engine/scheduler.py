"""The engine: a queue, decode slots, and a loop that keeps every slot busy.

Continuous batching: up to `max_num_seqs` sequences decode together, one token each a step.
A request waits in the queue until a slot and enough cache blocks are free, is prefilled,
and joins the decode batch at the next step; it leaves the moment it stops, and the next
waiting request takes its slot. Nothing waits for the batch's slowest member.

Chunked prefill: a prompt is computed `prefill_chunk` tokens at a time, and the loop
alternates one prefill step with one decode step, so a long prompt delays the running streams
by one chunk's time per token rather than by its whole prefill. Short prompts share a prefill
step, a row each, up to a chunk's tokens in all: a burst of requests gets its first tokens
after a step or two, not after one step per request.

Blocks, as vLLM takes them: a request is admitted when its prompt's blocks (less those found
in the prefix cache), and a small watermark besides, are free and not owed to prompts already
admitted; after that it takes blocks one at a time as positions fill. Clients ask for a large
`max_tokens` and stop early, so reserving the worst case would leave most of the pool idle.
When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks go back (its full ones stay in the prefix cache), and it returns to the
head of the queue. Resumed, its prompt and the tokens it had generated are its new prompt, so it
recomputes them, mostly from the prefix cache, and goes on drawing where it stopped: nothing
already streamed is sent again, and its draws (keyed by seed and token index) and penalty
counts continue as if it had never stopped. The oldest request is never preempted for a
younger one, so it always progresses.

Siblings: requests submitted together (`submit_many`, e.g. a request's n choices) with the
same prompt wait behind the first of them until its prompt is prefilled, then take its full
blocks from the prefix cache and a copy of its last, partial one, so that each computes only
its prompt's last token (which gives its first draw): the prompt is computed once.

A request that asks for its prompt's logprobs takes nothing from the prefix cache (they need
every position's logits), as in vLLM, though the blocks it fills are registered for others.

Overlap: a decode step is dispatched before the previous one's tokens are on the host. Its
input tokens are the previous choices, still on the device, and what the host must know to
build it (each sequence's position, blocks and settings) follows from one more token each.
The host then reads the previous step's tokens and does stop checks, text and events while the
device computes. A sequence found to have stopped has computed one token too many, into its
own blocks (freed after), which is thrown away; one that will reach `max_tokens` or the context
is known in advance and left out. Admission, prefill, aborts and preemption go on while a step
is in flight: the device runs programs in the order they were dispatched, so a block or slot
freed on the host is rewritten only after the step in flight has used it, and the step's rows
of sequences that have since finished, been preempted or been resumed are thrown away.

Slots: every running request holds one of `max_num_seqs` slots; a request whose logits are
adjusted (bias, penalties, min_tokens) keeps what that needs in its slot's row of the
device-side `sampling.SlotState`.

The loop runs on its own thread; `submit`, `submit_many` and `abort` may be called from any
thread, and each request's `on_event` is called on the loop's thread.

This module is over 600 lines because admission, preemption, prefill and the overlapped
decode step share one set of per-sequence states that each of them changes; split apart,
every piece would need the others' invariants.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import threading
import time
import traceback

import jax
import numpy as np

from scaling.data.tokenizer import Tokenizer
from scaling.engine import programs as programs_lib
from scaling.engine import sampling
from scaling.engine.blocks import BlockPool
from scaling.engine.requests import Event, Request, TextStream, TokenLogprob
from scaling.engine.stats import Stats
from scaling.models import paged


class QueueFull(Exception):
    """More requests are waiting than `max_queue` allows."""


@dataclasses.dataclass
class Step:
    """A decode step on the device whose tokens the host has not read yet."""

    rows: list[tuple[Sequence, int]]  # each row's sequence and its admission at dispatch
    choice: sampling.Choice  # on the device


@dataclasses.dataclass(eq=False)  # compared by identity: lists of them are searched often
class Sequence:
    """A request in the engine: its tokens, its blocks and how far its keys are written."""

    request: Request
    tokens: list[int]
    prefill_to: int  # tokens to compute before it decodes: its prompt, or all it had if resumed
    admitted: int  # admission order (a resumed request counts as admitted anew)
    blocks: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    hashed: int = 0  # leading blocks registered in the prefix cache
    last_key: bytes = b""
    cached_tokens: int = 0
    generated: int = 0
    pending: int = 0  # tokens chosen by steps dispatched and not yet read back
    text: TextStream | None = None
    last_token_time: float = 0.0
    slot: int | None = None  # its row of the sampling state; None once finished
    stop_ids: frozenset[int] = frozenset()  # the ids that end it
    prompt_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
    reported: bool = False  # an event has gone out (the prompt logprobs go with the first)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prefill_to

    @property
    def echoing(self) -> bool:
        """Whether its prefill must report the prompt's logprobs (none are out yet)."""
        return self.request.params.prompt_logprobs is not None and self.generated == 0


class Engine:
    """Serves many requests at once on one model; see the module docstring."""

    def __init__(self, programs: programs_lib.Programs, tokenizer: Tokenizer, max_queue: int,
                 stop_ids: frozenset[int] | None = None):
        """`stop_ids`: the model's end-of-sequence ids (its generation config's), which end a
        request unless it ignores them; by default the tokenizer's end id."""
        self.programs = programs
        self.layout = programs.layout
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.stop_ids = frozenset(stop_ids if stop_ids is not None else {tokenizer.eos_id})
        self._slot_ids = list(range(self.layout.max_num_seqs))[::-1]  # free slots
        self._leaders: dict[int, Request] = {}  # id(sibling) -> the request it waits for
        self.pool = BlockPool(self.layout.num_blocks, self.layout.block_size)
        self.stats = Stats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[str] = set()
        self._wake = threading.Condition()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []  # at most max_num_seqs, prefilling included
        # Preempted sequences, resumed before any waiting request, the first one first.
        self._preempted: collections.deque[Sequence] = collections.deque()
        self._admissions = 0
        self._in_flight: Step | None = None
        self.overlap = True  # False: each step's tokens are read before the next is built
        # Blocks kept free when admitting beside running requests, so that they can grow a
        # while before anyone is preempted (vLLM keeps 1% of the pool).
        self.watermark = max(1, self.layout.num_blocks // 100)
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

    def submit_many(self, requests: list[Request]) -> None:
        """Queues all of `requests` or, raising `QueueFull`, none. Those with the same
        prompt as an earlier one of the call wait for its prefill and share its blocks."""
        with self._wake:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting and "
                                f"{len(requests)} more do not fit (--max_queue)")
            first: dict[tuple[int, ...], Request] = {}
            for request in requests:
                if request.params.prompt_logprobs is not None:
                    continue  # it computes its whole prompt anyway
                leader = first.setdefault(tuple(request.prompt_ids), request)
                if leader is not request:
                    self._leaders[id(request)] = leader
            self._waiting.extend(requests)
            self.stats.requests_received += len(requests)
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Stops a request (its client went away); its slot and blocks are freed."""
        with self._wake:
            self._aborted.add(request_id)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._preempted)

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._aborted or self.running
                           or self._preempted or self._in_flight):
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
                else:
                    self._read_in_flight()
            except Exception:  # noqa: BLE001 - the server must outlive one bad step
                self._fail_running()

    def _fail_running(self) -> None:
        """Ends every running request with `error` after a step raised, so their clients
        get an answer and the slots and blocks are free for the next requests."""
        self.stats.step_errors += 1
        self._in_flight = None
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
                    self._leaders.pop(id(request), None)
                    request.on_event(Event(request.request_id, "", (), finish_reason="abort"))
            self._waiting = collections.deque(kept)
        for seq in [*self._prefilling, *self._decoding, *self._preempted]:
            if seq.request.request_id in aborted:
                self._finish(seq, "abort")

    def _free_slots(self) -> int:
        return self.layout.max_num_seqs - len(self._decoding) - len(self._prefilling)

    @property
    def _promised(self) -> int:
        """Blocks that admitted prompts will take before they decode and do not hold yet."""
        P = self.layout.block_size
        return sum(max(0, math.ceil(s.prefill_to / P) - len(s.blocks))
                   for s in self._prefilling)

    def _admit(self) -> None:
        """Moves preempted sequences, then waiting requests, oldest first, into prefill
        while slots and blocks last."""
        P = self.layout.block_size
        while self._free_slots() > 0:
            seq, leader = None, None
            with self._wake:
                if self._preempted:
                    seq = self._preempted[0]
                    request = seq.request
                elif self._waiting:
                    request = self._waiting[0]
                    leader = self._leaders.get(id(request))
                    if leader is not None and self._prefill_pending(leader):
                        return  # a sibling waits until its leader's blocks are in the cache
                else:
                    return
            params = request.params
            tokens = seq.tokens if seq is not None else request.prompt_ids
            blocks, key = [], b""
            echo = seq.echoing if seq is not None else params.prompt_logprobs is not None
            if not echo:  # an echo needs every position's logits
                blocks, key = self.pool.match_prefix(tokens, (len(tokens) - 1) // P)
            need = math.ceil(len(tokens) / P) - len(blocks)
            spare = self.watermark if self.running else 0
            if self.pool.available - self._promised - spare < need:
                self.pool.release(blocks)
                return  # the oldest waits for blocks; younger ones wait behind it
            if seq is None:
                with self._wake:
                    self._waiting.popleft()
                    self._leaders.pop(id(request), None)
                ends = set(params.stop_token_ids) | (
                    set() if params.ignore_eos else self.stop_ids)
                seq = Sequence(request=request, tokens=list(tokens), prefill_to=len(tokens),
                               admitted=0, cached_tokens=len(blocks) * P,
                               text=TextStream(self.tokenizer, params.stop, params.min_tokens,
                                               params.include_stop_str_in_output,
                                               params.skip_special_tokens),
                               stop_ids=frozenset(ends),
                               prompt_logprobs=[None] if params.prompt_logprobs is not None
                               else [])
                self.stats.prompt_tokens += len(tokens)
                self.stats.cached_prompt_tokens += seq.cached_tokens
            else:
                with self._wake:
                    self._preempted.popleft()
                seq.prefill_to = len(tokens)
            seq.blocks, seq.computed, seq.hashed, seq.last_key = (
                blocks, len(blocks) * P, len(blocks), key)
            seq.slot = self._slot_ids.pop()
            self._admissions += 1
            seq.admitted = self._admissions
            if params.adjusts_logits:
                self._ready_slot(seq)
            if leader is not None:
                self._copy_partial_block(seq, leader)
            self._prefilling.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Takes a running sequence's blocks and slot back and queues it to be resumed
        first; its full blocks stay in the prefix cache, so that resuming is cheap."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._decoding:
            self._decoding.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.hashed, seq.last_key = [], 0, 0, b""
        seq.pending = 0  # a token in flight is drawn again, alike, when it is resumed
        self._slot_ids.append(seq.slot)
        seq.slot = None
        if seq.echoing:
            seq.prompt_logprobs = [None]  # computed again, whole, when it is resumed
        with self._wake:
            self._preempted.appendleft(seq)
        self.stats.preemptions += 1

    def _take_blocks(self, seq: Sequence, positions: int) -> bool:
        """Takes blocks until the sequence has room for `positions`, preempting the most
        recently admitted running sequence while none is free; False when that was `seq`."""
        while len(seq.blocks) * self.layout.block_size < positions:
            if not self.pool.available:
                victim = max([*self._prefilling, *self._decoding], key=lambda s: s.admitted)
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(self.pool.allocate())
        return True

    def _copy_partial_block(self, seq: Sequence, leader: Request) -> None:
        """Gives a sibling a copy of its leader's block past the shared full ones, when the
        leader still holds it, so that only the prompt's last token is left to compute. The
        copy may hold the leader's first new tokens past the prompt: the sibling writes its
        own there before it ever reads them."""
        P = self.layout.block_size
        held = next((s for s in self._decoding if s.request is leader), None)
        index = len(seq.blocks)
        if held is None or index >= len(held.blocks) or seq.num_prompt - 1 <= index * P:
            return
        seq.blocks.append(self.pool.allocate())  # counted in the blocks admission found free
        self.programs.copy_block(held.blocks[index], seq.blocks[index])
        copied = seq.num_prompt - 1 - seq.computed
        seq.computed += copied
        seq.cached_tokens += copied

    def _prefill_pending(self, leader: Request) -> bool:
        """Whether `leader` is still waiting or prefilling."""
        return (any(r is leader for r in self._waiting)
                or any(s.request is leader for s in [*self._prefilling, *self._preempted]))

    def _ready_slot(self, seq: Sequence) -> None:
        """Writes a request's bias, stop ids, prompt tokens and the counts of the tokens it
        has generated (none, unless it is resumed) into its slot's state."""
        params = seq.request.params
        V = self.programs.model.config.vocab_size
        prompt_seen_V = np.zeros((V,), bool)
        prompt = np.asarray(seq.request.prompt_ids, np.int64)
        prompt_seen_V[prompt[(prompt >= 0) & (prompt < V)]] = True
        bias_V = np.zeros((V,), np.float32)
        for token, bias in params.logit_bias:
            if 0 <= token < V:
                bias_V[token] += bias
        # Masked until min_tokens: the model's end ids even when ignored, as vLLM does.
        stop_V = np.zeros((V,), bool)
        for token in self.stop_ids | set(params.stop_token_ids):
            if 0 <= token < V:
                stop_V[token] = True
        output = np.asarray(seq.tokens[seq.num_prompt:], np.int64)
        counts_V = np.bincount(output[(output >= 0) & (output < V)], minlength=V)
        self.programs.admit_slot(seq.slot, prompt_seen_V, bias_V, stop_V,
                                 counts_V.astype(np.int32))

    def _register_full_blocks(self, seq: Sequence) -> None:
        P = self.layout.block_size
        while seq.hashed < seq.computed // P:
            i = seq.hashed
            seq.last_key = self.pool.register(seq.blocks[i], seq.last_key,
                                              seq.tokens[i * P:(i + 1) * P])
            seq.hashed += 1

    def _row(self, seq: Sequence, start: int, end: int, width: int):
        """Positions, slots and block table of a sequence's tokens start..end-1."""
        positions = np.arange(start, end, dtype=np.int32)
        slots, table = paged.locate(np.asarray(seq.blocks, np.int32), positions, width,
                                    self.layout.block_size)
        return positions, slots, table

    def _settings(self, rows: list[Sequence | None],
                  choosing: list[bool] | None = None) -> sampling.RowSettings:
        """The rows' sampling settings; a row not `choosing` (a prompt chunk before the
        last) has its draw thrown away, so its slot state is left alone."""
        settings = self.programs.greedy_settings(len(rows))
        for i, seq in enumerate(rows):
            if seq is None:
                continue
            params = seq.request.params
            settings.temperature_B[i] = params.temperature
            settings.top_k_B[i] = params.top_k
            settings.top_p_B[i] = params.top_p
            settings.min_p_B[i] = params.min_p
            settings.seed_B[i] = params.seed % (1 << 32)
            settings.index_B[i] = seq.generated + seq.pending
            if params.adjusts_logits and (choosing is None or choosing[i]):
                settings.slot_B[i] = seq.slot
                settings.adjust_B[i] = True
                settings.mask_stops_B[i] = seq.generated + seq.pending < params.min_tokens
                settings.presence_B[i] = params.presence_penalty
                settings.frequency_B[i] = params.frequency_penalty
                settings.repetition_B[i] = params.repetition_penalty
        return settings

    def _chunk_end(self, seq: Sequence) -> int:
        return min(seq.prefill_to, seq.computed + self.layout.prefill_chunk)

    def _next_prefill(self) -> list[Sequence]:
        """The oldest prompts that one prefill step can hold: at least one per data-parallel
        row, and more while the rows' longest chunk times their count stays within a chunk."""
        layout, chosen, longest = self.layout, [], 0
        for seq in self._prefilling:
            n = self._chunk_end(seq) - seq.computed
            length = programs_lib.bucket(max(longest, n), layout.prefill_lengths)
            if len(chosen) >= layout.prefill_row_counts(length)[-1]:
                break
            chosen.append(seq)
            longest = max(longest, n)
        return chosen

    def _prefill_chunk(self) -> None:
        """One prefill step: a chunk of the oldest prompt, or of several short ones."""
        layout = self.layout
        chosen = self._next_prefill()
        for seq in chosen:
            if seq in self._prefilling:  # not preempted for an older row's blocks
                self._take_blocks(seq, self._chunk_end(seq))
        rows: list[Sequence | None] = [
            s for s in chosen if s in self._prefilling
            and len(s.blocks) * layout.block_size >= self._chunk_end(s)]
        if not rows:
            return
        spans = [(s.computed, self._chunk_end(s)) for s in rows]
        length = programs_lib.bucket(max(end - start for start, end in spans),
                                     layout.prefill_lengths)
        width = programs_lib.bucket(max(len(s.blocks) for s in rows), layout.prefill_widths)
        num_rows = programs_lib.bucket(len(rows), layout.prefill_row_counts(length))
        rows += [None] * (num_rows - len(rows))
        batch = self.programs.empty_batch(num_rows, length, width)
        tokens = np.zeros((num_rows, length), np.int32)
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
        choosing = [end == seq.prefill_to for seq, (_, end) in
                    zip(rows[:len(spans)], spans, strict=True)]
        choosing += [False] * (len(rows) - len(spans))
        settings = self._settings(rows, choosing)
        if any(s is not None and s.echoing for s in rows):
            next_ = np.zeros_like(tokens)
            for i, seq in enumerate(rows[:len(spans)]):
                start, end = spans[i]
                following = seq.request.prompt_ids[start + 1:end + 1]
                next_[i, :len(following)] = following
            choice, prompt = self.programs.run_echo(tokens, batch, settings, next_)
        else:
            choice = self.programs.run(tokens, batch, settings)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(end - start for start, end in spans)
        for i, seq in enumerate(rows[:len(spans)]):
            if seq.echoing:
                self._add_prompt_logprobs(seq, prompt, i, *spans[i])
            seq.computed = spans[i][1]
            self._register_full_blocks(seq)
            if not seq.prefilling:
                if seq.request.params.max_tokens == 0:  # the prompt's logprobs alone
                    self._finish(seq, "length")
                    continue
                self._prefilling.remove(seq)
                self._decoding.append(seq)
                if seq.generated:  # resumed after preemption
                    self.stats.inter_token_latency.observe(time.monotonic()
                                                           - seq.last_token_time)
                else:
                    self.stats.time_to_first_token.observe(time.monotonic()
                                                           - seq.request.arrival)
                self._accept(seq, choice, i)

    def _add_prompt_logprobs(self, seq: Sequence, prompt: programs_lib.PromptLogprobs,
                             row: int, start: int, end: int) -> None:
        """The logprobs of prompt tokens start+1..end (those that follow the chunk's)."""
        ids = seq.request.prompt_ids
        k = seq.request.params.prompt_logprobs
        for j, position in enumerate(range(start, min(end, len(ids) - 1))):
            top = tuple(zip(prompt.top_tokens_BLT[row, j, :k].tolist(),
                            prompt.top_logprobs_BLT[row, j, :k].tolist(), strict=True))
            seq.prompt_logprobs.append(TokenLogprob(
                ids[position + 1], float(prompt.next_logprob_BL[row, j]), top))

    def _continues(self, seq: Sequence) -> bool:
        """Whether a sequence may need another token once its pending ones are read: not if
        they take it to `max_tokens` or to the context's end."""
        return (seq.generated + seq.pending < seq.request.params.max_tokens
                and len(seq.tokens) + seq.pending < self.layout.max_seq_len)

    def _decode_step(self) -> None:
        """Dispatches one token for every decoding sequence, then reads the step before.
        Sequences sit in the first rows of the smallest compiled row count that holds them:
        a row is not tied to a sequence (the cache is reached through block tables), so a
        lone stream runs a one-row step."""
        started = time.perf_counter()
        layout = self.layout
        previous, self._in_flight = self._in_flight, None
        for seq in sorted(self._decoding, key=lambda s: s.admitted):
            if seq in self._decoding and self._continues(seq):  # not preempted meanwhile
                self._take_blocks(seq, len(seq.tokens) + seq.pending)
        running = [s for s in self._decoding if self._continues(s)]
        if running:
            self.stats.peak_running = max(self.stats.peak_running, len(running))
            width = programs_lib.bucket(max(len(s.blocks) for s in running),
                                        layout.decode_widths)
            num_rows = programs_lib.bucket(len(running), layout.decode_rows)
            rows: list[Sequence | None] = running + [None] * (num_rows - len(running))
            batch = self.programs.empty_batch(num_rows, 1, width)
            tokens = np.zeros((num_rows, 1), np.int32)
            source = np.full((num_rows,), -1, np.int32)
            previous_row = {} if previous is None else {
                id(seq): i for i, (seq, _) in enumerate(previous.rows)}
            for i, seq in enumerate(running):
                position = len(seq.tokens) - 1 + seq.pending
                positions, slots, table = self._row(seq, position, position + 1, width)
                if seq.pending:
                    source[i] = previous_row[id(seq)]
                else:
                    tokens[i, 0] = seq.tokens[-1]
                batch.positions_BL[i] = positions
                batch.slots_BL[i] = slots
                batch.block_table_BM[i] = table
            settings = self._settings(rows)
            if previous is not None and (source >= 0).any():
                tokens = self.programs.follow(previous.choice.token_B, source, tokens)
            self._in_flight = Step([(s, s.admitted) for s in running],
                                   self.programs.dispatch(tokens, batch, settings))
            for seq in running:
                seq.pending += 1
            self.steps += 1
            self.stats.decode_steps += 1
        self.stats.decode_host_seconds += time.perf_counter() - started
        if previous is not None:
            self._read(previous)
        if not self.overlap:
            self._read_in_flight()

    def _read_in_flight(self) -> None:
        """Reads the step in flight, if any, so that every sequence's tokens are known."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._read(step)

    def _read(self, step: Step) -> None:
        """Takes a step's tokens once the device has them. Rows of sequences that have
        since finished, or been preempted, are thrown away."""
        started = time.perf_counter()
        choice = jax.tree.map(np.asarray, step.choice)
        read = time.perf_counter()
        self.stats.decode_wait_seconds += read - started
        for i, (seq, admitted) in enumerate(step.rows):
            if seq.admitted != admitted or seq not in self._decoding:
                continue
            seq.pending -= 1
            seq.computed = len(seq.tokens)
            self._register_full_blocks(seq)
            now = time.monotonic()
            self.stats.inter_token_latency.observe(now - seq.last_token_time)
            self._accept(seq, choice, i)
        self.stats.decode_host_seconds += time.perf_counter() - read

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
        reason, stop_reason = None, None
        token_ids = (token,)  # a stop id too, as vLLM reports it, though it has no text
        if token in seq.stop_ids and seq.generated > params.min_tokens:
            reason = "stop"
            ended_by_eos = token == self.tokenizer.eos_id and not params.ignore_eos
            stop_reason = None if ended_by_eos else token
        else:
            seq.tokens.append(token)
            if seq.text.add(token):
                reason, stop_reason = "stop", seq.text.matched
            elif seq.generated >= params.max_tokens or len(seq.tokens) >= self.layout.max_seq_len:
                reason = "length"
        if reason is None:
            seq.request.on_event(self._event(seq, seq.text.take(final=False), token_ids,
                                             logprobs))
        else:
            self._finish(seq, reason, token_ids, logprobs, stop_reason)

    def _event(self, seq: Sequence, text: str, token_ids: tuple[int, ...],
               logprobs: tuple[TokenLogprob, ...], **fields) -> Event:
        """An event of `seq`; its first carries the prompt's logprobs."""
        prompt_logprobs = () if seq.reported else tuple(seq.prompt_logprobs)
        seq.reported = True
        return Event(seq.request.request_id, text, token_ids, logprobs,
                     prompt_logprobs=prompt_logprobs, **fields)

    def _finish(self, seq: Sequence, reason: str, token_ids: tuple[int, ...] = (),
                logprobs: tuple[TokenLogprob, ...] = (),
                stop_reason: int | str | None = None) -> None:
        """Ends a request: its blocks and slot go back, and its last event (with the text
        still held, unless a stop string cut it) goes out."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq in self._decoding:
            self._decoding.remove(seq)
        if seq in self._preempted:
            self._preempted.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        if seq.slot is not None:
            self._slot_ids.append(seq.slot)
            seq.slot = None
        self.stats.requests_finished[reason] += 1
        seq.request.on_event(self._event(
            seq, seq.text.take(final=True), token_ids, logprobs, finish_reason=reason,
            prompt_tokens=seq.num_prompt, completion_tokens=seq.generated,
            cached_tokens=seq.cached_tokens, stop_reason=stop_reason))
