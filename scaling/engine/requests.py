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
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives to report per token (0 to 5); None: none
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at this step, best first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one request: a text delta, the tokens behind it, and at the end why it
    stopped (`stop`, `length`, `abort`, or `error` when the engine failed) with the token
    counts."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache


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
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self._prefix = 0  # tokens[_prefix:_read] decode to the tail of `text`
        self._read = 0

    def add(self, token: int) -> bool:
        """Takes one token; True when a stop string has appeared (the text ends before it)."""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix:])
        if after.endswith("\ufffd"):  # a character still incomplete
            return False
        start = len(self.text)
        self.text += after[len(before):] if after.startswith(before) else after
        self._prefix, self._read = self._read, len(self.tokens)
        longest = max(map(len, self.stop), default=0)
        found = [i for i in (self.text.find(s, max(0, start - longest + 1)) for s in self.stop)
                 if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            return True
        return False

    def take(self, final: bool) -> str:
        """The text not handed out yet, less a tail that could begin a stop string."""
        end = len(self.text)
        if not final and self.stop:
            end = max(self.sent, end - max(map(len, self.stop)) + 1)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
