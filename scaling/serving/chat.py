"""Chat messages to prompt text, as `transformers` renders them.

A model imported from Hugging Face was trained on its own chat format, a Jinja template that
its directory carries: `chat_template.jinja` (what transformers 4.4x and 5 save), the older
`chat_template.json`, or the `chat_template` entry of `tokenizer_config.json`, looked for in
that order, with named alternatives in `additional_chat_templates/NAME.jinja` (a request with
tools takes `tool_use` when there is one, as transformers does). The template is rendered in
an environment like transformers': a sandbox with loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text and HTML characters as they are, and the
tokenizer's special pieces (`bos_token`, `eos_token`, ...) as variables. The template writes
the begin-of-text piece itself, so nothing is added to its output.

A model trained here has no chat format of its own, so the plain template is used: each
message on its own line as `role: content`, then `assistant:` for the reply to continue.

    system: You are terse.
    user: Name a prime.
    assistant:
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from scaling.errors import UserError
from scaling.interop.hf_config import read_json_object

HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON = "chat_template.json"
ADDITIONAL_TEMPLATES = "additional_chat_templates"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")


def plain(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _piece(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_templates(directory: Path) -> tuple[dict[str, str], Path | None]:
    """The directory's templates by name (`default` first) and the file the default came
    from; empty when it has none."""
    templates: dict[str, str] = {}
    source = None
    config_path = directory / HF_TOKENIZER_CONFIG
    if (directory / TEMPLATE_FILE).is_file():
        source = directory / TEMPLATE_FILE
        templates["default"] = source.read_text(encoding="utf-8")
    elif (directory / TEMPLATE_JSON).is_file():
        source = directory / TEMPLATE_JSON
        found = read_json_object(source).get("chat_template")
        if isinstance(found, str):
            templates["default"] = found
    elif config_path.is_file():
        found = read_json_object(config_path).get("chat_template")
        source = config_path
        if isinstance(found, str):
            templates["default"] = found
        elif isinstance(found, list):  # several named templates
            templates.update({t["name"]: t["template"] for t in found if isinstance(t, dict)
                              and isinstance(t.get("name"), str)
                              and isinstance(t.get("template"), str)})
    extra = directory / ADDITIONAL_TEMPLATES
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates.setdefault(path.stem, path.read_text(encoding="utf-8"))
    return templates, source


def special_pieces(directory: Path) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as the template sees them: the tokenizer config's, over
    the special tokens map's."""
    pieces: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP, HF_TOKENIZER_CONFIG):
        path = directory / name
        if path.is_file():
            config = read_json_object(path)
            pieces.update({key: piece for key in SPECIAL_NAMES
                           if (piece := _piece(config.get(key))) is not None})
    return pieces


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string):
        return datetime.datetime.now().strftime(format_string)

    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


class ChatTemplate:
    """Renders messages with the model's template if it has one, else the plain one."""

    def __init__(self, tokenizer_dir: Path | None):
        self._templates: dict = {}
        self._specials: dict[str, str] = {}
        if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
            return
        directory = Path(tokenizer_dir)
        sources, source = find_templates(directory)
        if not sources:
            return
        import jinja2

        environment = _environment()
        for name, text in sources.items():
            try:
                self._templates[name] = environment.from_string(text)
            except jinja2.TemplateError as e:
                raise UserError(f"{source}: the chat template {name!r} does not parse "
                                f"({e})") from None
        self._specials = special_pieces(directory)
        self.source = source

    @property
    def kind(self) -> str:
        return "plain" if not self._templates else "model"

    def _choose(self, tools) -> object:
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        return next(iter(self._templates.values()))

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list | None = None,
               documents: list | None = None, template_kwargs: dict | None = None) -> str:
        """The prompt text; ValueError (the client's) when the template refuses them."""
        if not self._templates:
            if tools or documents:
                raise ValueError("this model has no chat template to show tools or "
                                 "documents to")
            return plain(messages)
        import jinja2

        variables = {**self._specials, **(template_kwargs or {}), "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            variables["tools"] = tools
        if documents is not None:
            variables["documents"] = documents
        try:
            text = self._choose(tools).render(**variables)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ValueError(f"the model's chat template refused the messages: {e}") from None
        if continue_final_message:
            final = messages[-1].get("content") or ""
            at = text.rfind(final.strip()) if final.strip() else -1
            if at < 0:
                raise ValueError("continue_final_message: the template does not show the "
                                 "final message's content as given")
            text = text[:at + len(final.strip())]
        return text
