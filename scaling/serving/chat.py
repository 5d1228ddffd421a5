"""Chat messages to prompt text.

A model imported from Hugging Face was trained on its own chat format, which its
`tokenizer_config.json` carries as a Jinja template (`chat_template`); the import keeps that
file beside the saved tokenizer, and it is rendered here as the `transformers` library renders
it, with `add_generation_prompt` set so the text ends where the assistant's reply begins.

A model trained here has no chat format of its own, so the plain template is used: each
message on its own line as `role: content`, then `assistant:` for the reply to continue.

    system: You are terse.
    user: Name a prime.
    assistant:
"""

from __future__ import annotations

import json
from pathlib import Path

from scaling.errors import UserError

HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # what --mode=import_hf keeps beside the tokenizer


def plain(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ChatTemplate:
    """Renders messages with the model's template if it has one, else the plain one."""

    def __init__(self, tokenizer_dir: Path | None):
        self._template = None
        self._specials: dict = {}
        path = None if tokenizer_dir is None else Path(tokenizer_dir) / HF_TOKENIZER_CONFIG
        if path is None or not path.is_file():
            return
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the chat template ({e})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # several named templates: take the default one
            source = next((t.get("template") for t in source
                           if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(source, str):
            return
        import jinja2
        import jinja2.sandbox

        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(message)

        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"{path}: the chat_template does not parse ({e})") from None
        for name in ("bos_token", "eos_token"):
            value = config.get(name)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            self._specials[name] = value or ""

    @property
    def kind(self) -> str:
        return "plain" if self._template is None else "model"

    def render(self, messages: list[dict]) -> str:
        """The prompt text; ValueError (the client's) when the template refuses them."""
        if self._template is None:
            return plain(messages)
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._specials)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template refused the messages: {e}") from None
