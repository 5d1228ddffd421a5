"""The OpenAI API's request and response bodies, checked and built without any HTTP.

`/v1/completions` and `/v1/chat/completions` bodies become a prompt and the engine's
`SamplingParams`; engine events become the API's JSON objects, whole or as stream chunks.
Every mistake is an `ApiError` that names the field, with the status the API would give.

Fields the engine does not act on are refused when set to anything but their no-op value
(`n` other than 1, penalties other than 0, `echo`), so a client never believes it got what
it did not. Other unknown fields are ignored, as the API ignores them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from scaling.engine import Event, SamplingParams, TokenLogprob
from scaling.engine.sampling import TOP_LOGPROBS

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


def _number(body: dict, name: str, default, kind: type, low=None, high=None):
    """A numeric field of `kind` (int or float) within [low, high], or its default."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise _bad(name, f"expected {'an integer' if kind is int else 'a number'}, "
                   f"got {value!r}")
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low}" + (f" to {high}" if high is not None else " up")
        raise _bad(name, f"{value} is out of range; expected {bounds}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "expected a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(stop)


def _refuse_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise _bad("n", "only n=1 is served; send several requests for several choices")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name, 0) not in (0, 0.0, None):
            raise _bad(name, "penalties are not supported; leave it at 0")
    if body.get("echo"):
        raise _bad("echo", "echoing the prompt is not supported")


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    model: str
    prompt: str | list[int]  # text, or token ids given directly
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool


def parse(body: Any, chat: bool, default_max_tokens: int) -> ParsedRequest:
    """A completions or chat completions body, checked; chat messages are left in `prompt`
    as text for the caller to render (see `render_chat`)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "required, a string naming the model (see GET /v1/models)")
    _refuse_unsupported(body)
    if chat:
        prompt = body.get("messages")
        if not isinstance(prompt, list) or not prompt:
            raise _bad("messages", "required, a non-empty list of {role, content} objects")
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise _bad(f"messages[{i}]", "expected {\"role\": str, \"content\": str}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens_name = ("max_completion_tokens" if "max_completion_tokens" in body
                           else "max_tokens")
        if body.get("logprobs") not in (None, True, False):
            raise _bad("logprobs", "expected true or false")
        top = _number(body, "top_logprobs", 0, int, 0, TOP_LOGPROBS)
        logprobs = top if body.get("logprobs") else None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not ids:
            raise _bad("prompt", "required, a non-empty string or a list of token ids")
        max_tokens = body.get("max_tokens")
        max_tokens_name = "max_tokens"
        logprobs = _number(body, "logprobs", None, int, 0, TOP_LOGPROBS)
    max_tokens = _number({max_tokens_name: max_tokens}, max_tokens_name, default_max_tokens,
                         int, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "expected true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "expected true or false")
    seed = _number(body, "seed", None, int)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, -1),
        seed=uuid.uuid4().int % (1 << 32) if seed is None else seed % (1 << 32),
        stop=_stop(body), logprobs=logprobs, ignore_eos=ignore_eos)
    if params.top_k == -1:  # vLLM's spelling of "no limit"
        params = dataclasses.replace(params, top_k=0)
    if params.top_p == 0:
        raise _bad("top_p", "must be above 0; use temperature 0 for greedy decoding")
    return ParsedRequest(model=model, prompt=prompt, params=params, stream=stream,
                         include_usage=bool(options.get("include_usage", True)), chat=chat)


# --- responses --------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def _completion_logprobs(logprobs: list[TokenLogprob], piece, offset: int) -> dict:
    tokens, offsets = [], []
    for entry in logprobs:
        tokens.append(piece(entry.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [{piece(t): lp for t, lp in e.top} for e in logprobs],
            "text_offset": offsets}


def _chat_logprobs(logprobs: list[TokenLogprob], piece) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token, e.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in logprobs]}


@dataclasses.dataclass
class ResponseBuilder:
    """Builds one request's responses; `piece(token)` is the text of one token."""

    parsed: ParsedRequest
    model: str
    piece: Any
    request_id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    text_offset: int = 0

    def __post_init__(self):
        self.request_id = self.request_id or new_id(self.parsed.chat)

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict | None:
        if self.parsed.params.logprobs is None:
            return None
        if self.parsed.chat:
            return _chat_logprobs(logprobs, self.piece)
        out = _completion_logprobs(logprobs, self.piece, self.text_offset)
        return out

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model}

    def whole(self, events: list[Event]) -> dict:
        """The response of a request that did not stream: every event at once."""
        last = events[-1]
        text = "".join(e.text for e in events)
        logprobs = self._logprobs([lp for e in events for lp in e.logprobs])
        reason = last.finish_reason
        if self.parsed.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(last)}

    def chunk(self, event: Event, first: bool) -> dict:
        """One server-sent event's object for a stream."""
        logprobs = self._logprobs(list(event.logprobs))
        if self.parsed.chat:
            delta = {"content": event.text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs,
                      "finish_reason": event.finish_reason}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": event.text, "logprobs": logprobs,
                      "finish_reason": event.finish_reason}
            head = self._head("text_completion")
            self.text_offset += len(event.text)
        return {**head, "choices": [choice], "usage": None}

    def usage_chunk(self, last: Event) -> dict:
        obj = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(last)}
