"""Chat templates: a prompt as the turn an instruct model answers.

An instruct model's tokenizer directory carries a Jinja chat template (``chat_template.jinja``,
or ``chat_template`` in ``tokenizer_config.json``) that lays out a conversation in the model's
own markup (``<|im_start|>user ...``, ``[INST] ... [/INST]``). :class:`ChatTemplate` renders a
task's prompt as one user message (after an optional system message), or a prompt that is a
conversation (a list of ``{"role", "content"}`` messages, as TRL's conversational datasets
hold) as those messages, with the generation prompt that opens the assistant's turn, as
transformers' ``apply_chat_template(..., add_generation_prompt=True)`` renders it. A
conversation that ends with an assistant message is continued instead, as TRL does (the
completion goes on from that message's text: transformers' ``continue_final_message=True``).
The template writes its own BOS when the model wants one.

Rendering is deterministic: ``strftime_now``, which some templates call to print today's date,
is not provided, so they print the fixed date they fall back to, and a resumed run renders
the prompts it rendered before.
"""

from __future__ import annotations

import json
import os
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' separate chat template file
# Put after the content of an assistant message to continue, to find where it ends.
_CONTINUE = "NOVARL_CONTINUE_FINAL_MESSAGE "
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


class RenderError(ValueError):
    """A prompt the chat template cannot render. ``system_clash``: the prompt, a
    conversation, has its own system message and the system prompt is set too; ``index``: the
    prompt's place in the batch being encoded (set by the tokenizer), else None."""

    def __init__(self, message: str, *, system_clash: bool = False):
        super().__init__(message)
        self.system_clash = system_clash
        self.index: int | None = None


# The roles a conversation prompt may end with: the model answers a user or a tool, or
# continues its own (prefilled) message.
LAST_ROLES = ("user", "tool", "assistant")


def check_conversation(messages: Any) -> list[dict[str, str]]:
    """A conversation prompt as plain ``{"role", "content"}`` dicts.

    Raises:
        ValueError: ``messages`` is not a non-empty list of objects whose 'role' and 'content'
            are strings (the message names the first that is not), or its last message's
            role is not one of :data:`LAST_ROLES`.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(
            f"a conversation must be a non-empty list of {{'role', 'content'}} messages, got "
            f"{messages!r:.80}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise ValueError(
                f"message {i} of the conversation must be an object with string 'role' and "
                f"'content', got {message!r:.80}"
            )
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] not in LAST_ROLES:
        raise ValueError(
            f"the conversation ends with a {out[-1]['role']!r} message; its last message must "
            f"be one of {list(LAST_ROLES)} (a model answers the user or a tool, or continues "
            "its own message)"
        )
    return out


def is_conversation(prompt: Any) -> bool:
    """Whether a prompt is a conversation (a list of messages) rather than a text."""
    return isinstance(prompt, list | tuple)


def prompt_text(prompt: Any) -> str:
    """A prompt's text to quote in a message: a conversation's last message's content."""
    if is_conversation(prompt):
        last = prompt[-1] if prompt else None
        return last.get("content", "") if isinstance(last, dict) else str(last)
    return prompt if isinstance(prompt, str) else str(prompt)


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
        ValueError: the template is not valid Jinja; RenderError: rendering a prompt fails (a
            template that refuses a system message raises its own error), naming ``where``.
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

    def messages(self, prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation a prompt is rendered as: a text as the user's message, a
        conversation as it is; both after the system prompt when one is set.

        Raises:
            ValueError: a malformed conversation; RenderError: one with its own system
                message when the system prompt is set too (it would have two).
        """
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if not is_conversation(prompt):
            return [*system, {"role": "user", "content": prompt}]
        messages = check_conversation(prompt)
        if system and messages[0]["role"] == "system":
            raise RenderError(
                "the conversation has its own system message, and the system prompt would add "
                "a second; leave the system prompt empty, or the message out of the prompts",
                system_clash=True,
            )
        return [*system, *messages]

    def render(self, prompt: str | list[dict[str, str]]) -> str:
        """The prompt as the template lays out its messages and opens the assistant's turn."""
        import jinja2

        try:
            messages = self.messages(prompt)
        except ValueError as e:
            clash = isinstance(e, RenderError) and e.system_clash
            raise RenderError(f"{self.where}: {e}", system_clash=clash) from None
        final = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        if final is not None:  # marked, to be found in the text and cut there
            messages = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE}]
        try:
            text = self._template.render(
                messages=messages,
                add_generation_prompt=final is None,
                tools=None,  # no tool or document sections, as transformers passes them
                documents=None,
                **self.special_tokens,
            )
        except (jinja2.TemplateError, TemplateRaised, TypeError, ValueError) as e:
            raise RenderError(f"{self.where}: the chat template failed to render ({e})") from None
        return text if final is None else self._continued(text)

    def _continued(self, text: str) -> str:
        """``text`` (rendered with the final message's content marked at its end) cut where
        that content ends, so that the completion continues it, as transformers'
        ``continue_final_message`` does: where the template kept the mark's trailing space
        it kept the content's own end as written; where it trimmed, the content's trailing
        whitespace goes too."""
        at = text.rfind(_CONTINUE.strip())
        if at < 0:
            raise RenderError(
                f"{self.where}: the conversation ends with an assistant message to continue, "
                "but the template does not write its text"
            )
        head = text[:at] if text.startswith(_CONTINUE, at) else text[:at].rstrip()
        # A template that writes the message more than once: its earlier copies lose the mark.
        return head.replace(_CONTINUE, "").replace(_CONTINUE.strip(), "")


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
