"""Chat messages to a prompt: the model's Jinja chat template (`tokenizer_config.json`) or a plain one."""

import json
from pathlib import Path

from ..errors import InvalidValueError

# Used when the model ships no template: one "role: content" line per message, then the
# assistant's turn.
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def find_chat_template(directory: str | Path) -> tuple[str | None, dict]:
    """`(template, special tokens)` from the `tokenizer_config.json` of `directory` or of
    its `tokenizer/` or `pipeline/tokenizer/` folder; `(None, {})` when there is none."""
    root = Path(directory)
    for folder in (root, root / "tokenizer", root / "pipeline" / "tokenizer"):
        path = folder / "tokenizer_config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise InvalidValueError(f"{path} is not valid JSON ({error}).") from None
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
            return (template if isinstance(template, str) else None), tokens
    return None, {}


def _token_text(token) -> str:
    """A special token as tokenizer_config.json gives it: a string or `{"content": ...}`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


class ChatTemplate:
    """Renders chat messages with a Jinja template in a sandbox (as transformers does).

    Arguments:
        template: the Jinja source (default `PLAIN_TEMPLATE`).
        special_tokens: `bos_token`, `eos_token` and the like, visible to the template.
    """

    def __init__(self, template: str | None = None, special_tokens: dict | None = None):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(PLAIN_TEMPLATE if template is None else template)
        except TemplateError as error:
            raise InvalidValueError(f"the chat template does not parse ({error}).") from None
        self.special_tokens = dict(special_tokens or {})
        self.is_plain = template is None

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` (`[{"role": ..., "content": ...}, ...]`), ending with
        the assistant's turn."""
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as error:
            raise InvalidValueError(f"the chat template refused the messages: {error}") from None
