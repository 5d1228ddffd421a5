"""The OpenAI API's request and response bodies, checked and built without any HTTP.

`/v1/completions` and `/v1/chat/completions` bodies become prompts and the engine's
`SamplingParams`; engine events become the API's JSON objects, whole or as stream chunks.
Every mistake is an `ApiError` that names the field, with the status the API would give.

Every field the API or vLLM defines either acts or is refused with a 400 that names it
(`REFUSED`, and values of `response_format`, `tool_choice` and `best_of` that would need what
is not served); `null` is the field's default, as the SDKs send it. Fields neither defines
are ignored, as vLLM ignores them. docs/serving.md has the table.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from scaling.engine import SamplingParams, TokenLogprob

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default)
MAX_CHOICES = 128  # n, and n times the prompts of a batch
LOGIT_BIAS_LIMIT = 100.0
# Fields the API or vLLM define that this server does not act on: refused unless null or
# their no-op value.
REFUSED = {
    "suffix": None, "use_beam_search": False, "length_penalty": 1,
    "truncate_prompt_tokens": None, "guided_json": None, "guided_regex": None,
    "guided_choice": None, "guided_grammar": None, "guided_decoding_backend": None,
    "structured_outputs": None, "prompt_logprobs": None, "chat_template": None,
    "allowed_token_ids": None, "bad_words": None, "functions": None, "function_call": None,
    "audio": None, "modalities": None, "prediction": None, "web_search_options": None,
    "reasoning_effort": None, "logits_processors": None,
}
CHAT_ONLY = ("messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
             "documents", "chat_template_kwargs", "add_generation_prompt",
             "continue_final_message", "parallel_tool_calls")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
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
        raise bad(name, f"expected {'an integer' if kind is int else 'a number'}, "
                  f"got {value!r}")
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low}" + (f" to {high}" if high is not None else " up")
        raise bad(name, f"{value} is out of range; expected {bounds}")
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "expected a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(s for s in stop if s)


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_id(t) for t in value):
        raise bad(name, "expected a list of token ids")
    return tuple(value)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise bad("logit_bias", "expected an object mapping token ids to biases")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"key {key!r} is not a token id") from None
        if token < 0 or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("logit_bias", f"{key!r}: expected a token id and a number")
        pairs.append((token, max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))))
    return tuple(pairs)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    for name, no_op in REFUSED.items():
        value = body.get(name)
        if value is not None and value != no_op:
            raise bad(name, "not supported by this server; leave it out")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format", "only {\"type\": \"text\"} is served; structured output "
                  "(json_object, json_schema) is not supported")
    if not chat:
        for name in CHAT_ONLY:
            if body.get(name) is not None:
                raise bad(name, "a /v1/chat/completions field; /v1/completions takes prompt")
        return
    if body.get("echo") not in (None, False):
        raise bad("echo", "echo is a /v1/completions field")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools", "expected a list of tool objects")
    tool_choice = body.get("tool_choice")
    if tools and tool_choice != "none":
        raise bad("tool_choice", "tool calls are not parsed by this server: send "
                  "tool_choice \"none\" to show the tools to the model's template, or no tools")
    if tool_choice not in (None, "none", "auto") or (tool_choice == "auto" and tools):
        raise bad("tool_choice", "only \"none\" is served")


def _text_content(content, where: str) -> str:
    """A message's content: a string, or an array of text parts joined by newlines (what
    vLLM hands a string-content template)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad(where, "expected a string or an array of {\"type\": \"text\", ...} parts")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(f"{where}[{j}]", f"part of type {kind!r} is not supported; this model "
                      "takes text parts only")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required, a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise bad(f"messages[{i}]", "expected an object with a string role")
        checked.append({**message,
                        "content": _text_content(message.get("content"),
                                                 f"messages[{i}].content")})
    return checked


def _prompts(body: dict) -> list[str | list[int]]:
    """A completions prompt: a string, token ids, or a batch of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_id(t) for t in p))
            for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "required: a string, a list of token ids, or a list of either")
    for i, p in enumerate(prompts):
        if not p:
            raise bad("prompt", f"prompt {i} is empty")
    return prompts


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """What the chat template is given besides the messages."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list | None = None
    documents: list | None = None
    template_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    model: str
    prompts: tuple  # completions: strings or token-id lists; chat: one list of messages
    params: SamplingParams  # max_tokens is None here when the request left it to the server
    n: int
    stream: bool
    chat: bool
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    add_special_tokens: bool = True
    chat_options: ChatOptions = ChatOptions()

    @property
    def max_tokens(self) -> int | None:
        return self.params.max_tokens


def parse(body: Any, chat: bool, default_max_tokens: int,
          defaults: dict | None = None) -> ParsedRequest:
    """A completions or chat completions body, checked; `defaults` are the model's own
    (its generation_config.json), taken for the sampling fields the request leaves null."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    defaults = defaults or {}
    body = {**{k: v for k, v in defaults.items() if k != "max_tokens"},
            **{k: v for k, v in body.items() if v is not None}}
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "required, a string naming the model (see GET /v1/models)")
    _refuse_unsupported(body, chat)
    options = ChatOptions()
    if chat:
        prompts = (_messages(body),)
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number(body, name, defaults.get("max_tokens"), int, 1)
        top = _number(body, "top_logprobs", 0, int, 0, MAX_LOGPROBS)
        logprobs = top if _flag(body, "logprobs", False) else None
        if top and logprobs is None:
            raise bad("top_logprobs", "needs logprobs: true")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "expected an object")
        for name in ("tools", "documents"):
            if body.get(name) is not None and not isinstance(body[name], list):
                raise bad(name, "expected a list")
        options = ChatOptions(
            add_generation_prompt=_flag(body, "add_generation_prompt", True),
            continue_final_message=_flag(body, "continue_final_message", False),
            tools=body.get("tools"), documents=body.get("documents"), template_kwargs=kwargs)
        if options.add_generation_prompt and options.continue_final_message:
            raise bad("continue_final_message", "cannot be true with add_generation_prompt")
        echo = False
        add_special = _flag(body, "add_special_tokens", False)
    else:
        prompts = tuple(_prompts(body))
        echo = _flag(body, "echo", False)
        max_tokens = _number(body, "max_tokens", defaults.get("max_tokens", default_max_tokens),
                             int, 0 if echo else 1)
        logprobs = _number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
        add_special = _flag(body, "add_special_tokens", True)
    n = _number(body, "n", 1, int, 1, MAX_CHOICES)
    best_of = _number(body, "best_of", n, int, 1)
    if best_of != n:
        raise bad("best_of", "only best_of equal to n is served (every choice is returned)")
    if n * len(prompts) > MAX_CHOICES:
        raise bad("n", f"{n} choices for each of {len(prompts)} prompts exceed "
                  f"{MAX_CHOICES}; split the batch")
    stream = _flag(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options", "expected an object")
    if stream_options and not stream:
        raise bad("stream_options", "only with stream: true")
    seed = _number(body, "seed", None, int)
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature,
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, -1),
        min_p=_number(body, "min_p", 0.0, float, 0.0, 1.0),
        seed=uuid.uuid4().int % (1 << 32) if seed is None else seed % (1 << 32),
        stop=_stop(body), stop_token_ids=_token_ids(body, "stop_token_ids"),
        ignore_eos=_flag(body, "ignore_eos", False),
        min_tokens=_number(body, "min_tokens", 0, int, 0),
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output", False),
        skip_special_tokens=_flag(body, "skip_special_tokens", True),
        logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
        logit_bias=_logit_bias(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, float, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, float, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, 2.0))
    if params.top_k == -1:  # vLLM's spelling of "no limit"
        params = dataclasses.replace(params, top_k=0)
    if params.top_p == 0:
        raise bad("top_p", "must be above 0; use temperature 0 for greedy decoding")
    if max_tokens is not None and params.min_tokens > max_tokens:
        raise bad("min_tokens", f"{params.min_tokens} is above max_tokens {max_tokens}")
    return ParsedRequest(
        model=model, prompts=prompts, params=params, n=n, stream=stream, chat=chat,
        include_usage=_flag(stream_options, "include_usage", False),
        continuous_usage=_flag(stream_options, "continuous_usage_stats", False),
        echo=echo, add_special_tokens=add_special, chat_options=options)


# --- responses --------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


@dataclasses.dataclass
class Choice:
    """One choice as it builds up: its prompt, its text so far and its tokens' logprobs."""

    index: int
    prompt_index: int
    prompt_tokens: int
    prompt_text: str = ""  # echoed before the text
    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob, echoed ones first
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or id that ended it, as vLLM
    sent_head: bool = False  # a stream has sent its first chunk (role, echoed prompt)


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once a prompt (its choices share it), completion tokens of every choice."""
    prompts = {c.prompt_index: (c.prompt_tokens, c.cached_tokens) for c in choices}
    prompt_tokens = sum(p for p, _ in prompts.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}


@dataclasses.dataclass
class ResponseBuilder:
    """Builds one request's responses; `piece(token)` is the text of one token."""

    parsed: ParsedRequest
    model: str
    piece: Any
    request_id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.request_id = self.request_id or new_id(self.parsed.chat)

    def _head(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.model}

    @property
    def _object(self) -> str:
        if self.parsed.chat:
            return "chat.completion.chunk" if self.parsed.stream else "chat.completion"
        return "text_completion"

    def _completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        """The completions API's four parallel lists; the top dict holds the chosen token
        beside the alternatives, as vLLM's does; an echoed first token has no logprob."""
        tokens, offsets, logprobs, tops = [], [], [], []
        for entry in entries:
            text = self.piece(entry.token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            logprobs.append(entry.logprob)
            if entry.logprob is None:
                tops.append(None)
                continue
            top = {self.piece(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_logprobs(self, entries: list) -> dict:
        def entry_of(token: int, logprob: float) -> dict:
            text = self.piece(token)
            return {"token": text, "logprob": max(logprob, -9999.0),
                    "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry_of(e.token, e.logprob),
                             "top_logprobs": [entry_of(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _logprobs(self, entries: list, offset: int) -> dict | None:
        if self.parsed.params.logprobs is None:
            return None
        if self.parsed.chat:
            return self._chat_logprobs(entries)
        return self._completion_logprobs(entries, offset)

    def whole(self, choices: list[Choice]) -> dict:
        """The response of a request that did not stream: every choice at once."""
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            logprobs = self._logprobs(c.logprobs, 0)
            if self.parsed.chat:
                out.append({"index": c.index, "message": {"role": "assistant",
                                                          "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
            else:
                out.append({"index": c.index, "text": c.prompt_text + c.text,
                            "logprobs": logprobs, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        return {**self._head(self._object), "choices": out, "usage": usage(choices)}

    def chunks(self, choice: Choice, text: str, echoed: list[TokenLogprob],
               logprobs: list[TokenLogprob], finish_reason: str | None,
               all_choices: list[Choice]) -> list[dict]:
        """The stream's objects for one piece of one choice: its head first (the role, or
        the echoed prompt with its logprobs), then the piece if it has text, logprobs or an
        end. `choice.text` already holds `text`."""
        out = []
        if not choice.sent_head:
            choice.sent_head = True
            if self.parsed.chat:
                out.append(self._chunk(choice.index, {"role": "assistant", "content": ""},
                                       None, None))
            elif self.parsed.echo:
                out.append(self._chunk(choice.index, choice.prompt_text,
                                       self._logprobs(echoed, 0), None))
        if text or logprobs or finish_reason is not None:
            body: Any = {"content": text} if text or not self.parsed.chat else {}
            if not self.parsed.chat:
                body = text
            offset = len(choice.prompt_text) + len(choice.text) - len(text)
            out.append(self._chunk(choice.index, body, self._logprobs(logprobs, offset),
                                   finish_reason))
            if finish_reason is not None:
                out[-1]["choices"][0]["stop_reason"] = choice.stop_reason
        if self.parsed.continuous_usage and self.parsed.include_usage:
            for chunk in out:
                chunk["usage"] = usage(all_choices)
        return out

    def _chunk(self, index: int, body, logprobs: dict | None, finish_reason) -> dict:
        key = "delta" if self.parsed.chat else "text"
        return {**self._head(self._object),
                "choices": [{"index": index, key: body, "logprobs": logprobs,
                             "finish_reason": finish_reason}],
                "usage": None}

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {**self._head(self._object), "choices": [], "usage": usage(choices)}
