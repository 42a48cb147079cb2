"""Chat templates: a prompt as the turn an instruct model answers.

An instruct model's tokenizer directory carries a Jinja chat template (``chat_template.jinja``,
or ``chat_template`` in ``tokenizer_config.json``) that lays out a conversation in the model's
own markup (``<|im_start|>user ...``, ``[INST] ... [/INST]``). :class:`ChatTemplate` renders a
task's prompt as one user message (after an optional system message) with the generation
prompt that opens the assistant's turn, as transformers' ``apply_chat_template(...,
add_generation_prompt=True)`` renders it. The template writes its own BOS when the model wants
one.

Rendering is deterministic: ``strftime_now``, which some templates call to print today's date,
is not provided, so they print the fixed date they fall back to, and a resumed run renders
the prompts it rendered before.
"""

from __future__ import annotations

import json
import os
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' separate chat template file
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def read_tokenizer_config(directory: str | os.PathLike) -> dict:
    """The settings of a tokenizer directory's ``tokenizer_config.json`` ({} without one).

    Raises:
        ValueError: the file cannot be read, or holds no JSON object (naming it).
    """
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    return settings


def special_token_text(settings: dict, name: str) -> str | None:
    """The text of the special token ``name`` (``'bos_token'``, ...) in tokenizer_config.json
    ``settings``: given as a string or as an object with its ``content``; None without one."""
    token = settings.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class ChatTemplate:
    """A Jinja chat template, compiled once.

    Args:
        source: the template's text.
        special_tokens: strings the template may name, such as ``bos_token`` and
            ``eos_token`` (as ``tokenizer_config.json`` gives them).
        system_prompt: a system message before every prompt ('' = none).
        where: where the template came from, for error messages.

    Raises:
        ValueError: the template is not valid Jinja, or rendering a prompt fails (a template
            that refuses a system message raises its own error), naming ``where``.
    """

    def __init__(
        self,
        source: str,
        *,
        special_tokens: dict[str, str] | None = None,
        system_prompt: str = "",
        where: str = "the chat template",
    ):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{where}: the chat template is empty")
        if not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a str, got {system_prompt!r}")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _generation_tag()],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"{where}: not a valid Jinja template ({e})") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.system_prompt = system_prompt
        self.where = where
        self.render("")  # fails now, naming where, rather than at the first rollout

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kwargs: Any) -> ChatTemplate:
        """The template of a tokenizer directory: ``chat_template.jinja``, else the
        ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named
        templates, of which the one named 'default'); its special tokens are that file's.

        Raises:
            ValueError: the directory has no chat template, or its files cannot be read.
        """
        directory = os.fspath(directory)
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        settings = read_tokenizer_config(directory)
        special = {
            name: text
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := special_token_text(settings, name)) is not None
        }
        file = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    source, where = f.read(), file
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{file}: cannot be read ({e})") from None
        else:
            source, where = _named_default(settings.get("chat_template"), config_path), config_path
            if source is None:
                raise ValueError(
                    f"{directory} has no chat template (neither {CHAT_TEMPLATE_FILE} nor a "
                    f"chat_template in {TOKENIZER_CONFIG_FILE})"
                )
        return cls(source, special_tokens={**special, **kwargs.pop("special_tokens", {})},
                   where=where, **kwargs)  # fmt: skip

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The conversation a prompt is rendered as."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    def render(self, prompt: str) -> str:
        """The prompt as the template lays out its user turn and opens the assistant's."""
        import jinja2

        try:
            return self._template.render(
                messages=self.messages(prompt),
                add_generation_prompt=True,
                tools=None,  # no tool or document sections, as transformers passes them
                documents=None,
                **self.special_tokens,
            )
        except (jinja2.TemplateError, TemplateRaised, TypeError, ValueError) as e:
            raise ValueError(f"{self.where}: the chat template failed to render ({e})") from None


def _generation_tag() -> Any:
    """A Jinja extension for ``{% generation %}...{% endgeneration %}``, which templates
    written for training on assistant turns only put around those turns: their text is
    rendered as it is (the marks matter to a loss mask, not to the prompt)."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


class TemplateRaised(Exception):
    """What a template's ``raise_exception(message)`` raises."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **kwargs: Any):
    """Jinja's ``tojson`` as chat templates expect it: plain JSON, non-ASCII kept."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, **kwargs)


def _named_default(templates: Any, where: str) -> str | None:
    """A ``chat_template`` entry's template: a string, or from a list of
    ``{"name": ..., "template": ...}`` the one named 'default'."""
    if templates is None or isinstance(templates, str):
        return templates
    if isinstance(templates, list):
        named = {t.get("name"): t.get("template") for t in templates if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{where}: chat_template lists no template named 'default'")
    raise ValueError(f"{where}: chat_template must be a string or a list of named templates")
