"""What a request asks of the engine, and what the engine tells it back.

The engine speaks token ids and text, not HTTP: the front end turns a JSON body into a
`Request` and each `Event` into a response or a server-sent event. Text is made here, in the
engine's thread, because stop strings end generation and must be seen as soon as they appear.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from scaling.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings, with vLLM's meanings.

    Bias, penalties and the `min_tokens` mask change the logits that tokens are chosen from;
    the log-probabilities reported are always the model's own (vLLM's `raw_logprobs`).
    """

    max_tokens: int = 16  # 0: the prompt only (with prompt_logprobs), finish_reason length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # tokens less likely than this share of the likeliest are not drawn
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives to report per token (0 to 20); None: none
    ignore_eos: bool = False  # the model's end ids do not end it (stop_token_ids still do)
    stop_token_ids: tuple[int, ...] = ()  # further ids that end it (finish_reason stop)
    # Until this many new tokens: end ids and stop_token_ids are never drawn, and no stop
    # string is matched in their text.
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # a matched stop string stays in the text
    skip_special_tokens: bool = True  # special pieces have no text
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    presence_penalty: float = 0.0  # subtracted from tokens already in the output
    frequency_penalty: float = 0.0  # times each token's count in the output, subtracted
    repetition_penalty: float = 1.0  # tokens in prompt or output: logit/p if > 0 else logit·p

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits are changed before choosing (bias, penalties, min_tokens)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens > 0)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this step, best first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one request: a text delta, the tokens behind it, and at the end why it
    stopped (`stop`, `length`, `abort`, or `error` when the engine failed) with the token
    counts.

    A stop id that ends the request is in `token_ids` (and counted, with its logprob) but has
    no text, as in vLLM; `stop_reason` names it, or the stop string matched (None for the
    model's end ids). `prompt_logprobs` comes with the first event: entry 0 is None, entry i
    is prompt token i given the ones before it.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    stop_reason: int | str | None = None


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]  # called on the engine's thread; must not block
    arrival: float = dataclasses.field(default_factory=time.monotonic)


class TextStream:
    """Turns new token ids into new text, holding back what is not settled yet.

    Tokens are decoded from a few tokens back rather than one at a time, so a character split
    over several byte tokens, or a piece whose leading space depends on what precedes it,
    comes out whole. Text that could still become a stop string is held back until it cannot.
    When the request ends other than on a stop string, `take(final=True)` flushes what is
    held, an unfinished character as U+FFFD, so the text is the decode of every token.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], min_tokens: int = 0,
                 include_stop: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.matched: str | None = None  # the stop string that ended the text
        self._searchable = 0  # stop strings must end past this (text of min_tokens is not)
        self._prefix = 0  # tokens[_prefix:_read] decode to the tail of `text`
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _extend(self, after: str) -> None:
        """Appends the text of tokens[_read:] to `text`, given that of tokens[_prefix:]."""
        before = self._decode(self.tokens[self._prefix:self._read])
        self.text += after[len(before):] if after.startswith(before) else after
        self._prefix, self._read = self._read, len(self.tokens)

    def add(self, token: int) -> bool:
        """Takes one token; True when a stop string has appeared (the text ends before it,
        or after it with `include_stop`)."""
        self.tokens.append(token)
        after = self._decode(self.tokens[self._prefix:])
        if after.endswith("\ufffd"):
            return False  # a character still incomplete
        start = len(self.text)
        self._extend(after)
        if len(self.tokens) <= self.min_tokens:
            self._searchable = len(self.text)
            return False
        settled = max(start, self._searchable)
        found = []
        for stop in self.stop:
            i = self.text.find(stop, max(0, settled - len(stop) + 1))
            if i >= 0:
                found.append((i, stop))
        if found:
            i, self.matched = min(found)
            self.text = self.text[:i + len(self.matched) * self.include_stop]
            return True
        return False

    def take(self, final: bool) -> str:
        """The text not handed out yet, less a tail that could begin a stop string."""
        if final and self.matched is None and self._read < len(self.tokens):
            self._extend(self._decode(self.tokens[self._prefix:]))  # U+FFFD for the rest
        end = len(self.text)
        if not final and self.stop:
            end = max(self.sent, end - max(map(len, self.stop)) + 1)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
