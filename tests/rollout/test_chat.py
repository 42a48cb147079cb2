"""Chat templates: rendering a prompt as a user turn, where templates are found, errors."""

import json

import pytest

from novarl_jax.rollout.chat import ChatTemplate, RenderError

# A ChatML template (Qwen's layout) and an [INST] one that writes BOS and refuses a system
# message (as some Llama 2 and Gemma templates do).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}[INST] {{ message['content'] | trim }} [/INST]{% endfor %}"
)


def test_a_prompt_is_rendered_as_the_user_turn_with_the_assistants_opened():
    chat = ChatTemplate(CHATML)
    assert chat.render("2+3=?") == "<|im_start|>user\n2+3=?<|im_end|>\n<|im_start|>assistant\n"
    chat = ChatTemplate(CHATML, system_prompt="Answer in \\boxed{}.")
    assert chat.render("2+3=?") == (
        "<|im_start|>system\nAnswer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n2+3=?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate(INST, special_tokens={"bos_token": "<s>"}).render(" hi ") == (
        "<s>[INST] hi [/INST]"
    )


def test_block_tags_leave_no_whitespace_and_tojson_keeps_non_ascii_as_transformers():
    # transformers renders with trim_blocks and lstrip_blocks, and a tojson that keeps "é".
    lines = "{% for m in messages %}\n  {{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert ChatTemplate(lines).render("café") == "  user: café\n"
    assert ChatTemplate("{{ messages | tojson }}").render("café") == (
        '[{"role": "user", "content": "café"}]'
    )


def test_a_final_message_the_template_writes_twice_is_continued_at_its_last_copy():
    twice = "{{ messages[-1].content }}|{% for m in messages %}{{ m.role }}:{{ m.content }};"
    twice += "{% endfor %}"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "It is"}]
    assert ChatTemplate(twice).render(conversation) == "It is|user:q;assistant:It is"


def test_a_conversation_prompt_is_rendered_as_its_messages():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3=?"},
    ]
    want = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3=?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate(CHATML).render(conversation) == want
    # The system prompt goes before a conversation without a system message of its own ...
    assert ChatTemplate(CHATML, system_prompt="Be brief.").render(conversation[1:]) == want
    # ... and is refused beside one, which would make two.
    with pytest.raises(RenderError, match=r"has its own system message") as info:
        ChatTemplate(CHATML, system_prompt="Hi.").render(conversation)
    assert info.value.system_clash
    # Malformed conversations name the message at fault.
    for bad, match in (
        ([], r"non-empty list"),
        ([{"role": "user"}], r"message 0 of the conversation must be an object with string"),
        ([{"role": "user", "content": "a"}, "b"], r"message 1 of the conversation"),
    ):
        with pytest.raises(RenderError, match=match) as info:
            ChatTemplate(CHATML).render(bad)
        assert not info.value.system_clash
    # A conversation ending with an assistant message is continued from its text, cut where
    # that text ends (not at a later piece of markup that spells the same).
    prefilled = [*conversation, {"role": "assistant", "content": "The answer is"}]
    assert ChatTemplate(CHATML).render(prefilled) == want + "The answer is"
    prefilled = [*conversation, {"role": "assistant", "content": "end"}]
    assert ChatTemplate(CHATML).render(prefilled) == want + "end"
    trimmed = "{% for m in messages %}{{ m['content'] | trim + '\n' }}{% endfor %}"
    prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So \n"}]
    assert ChatTemplate(trimmed).render(prefilled) == "hi\nSo"  # trimmed: its space goes
    prefilled = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So "}]
    assert ChatTemplate(CHATML).render(prefilled).endswith("assistant\nSo ")  # kept: stays
    with pytest.raises(RenderError, match=r"ends with a 'system' message; its last message"):
        ChatTemplate(CHATML).render(conversation[:1])
    silent = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
    with pytest.raises(RenderError, match=r"does not write its text"):
        ChatTemplate(silent + "{% endfor %}").render(prefilled)
    # A template's own refusal of a conversation (roles that do not alternate).
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(RenderError, match=r"failed to render \(roles must alternate\)"):
        ChatTemplate(strict).render([{"role": "user", "content": "a"}] * 2)


def test_the_template_is_read_from_the_tokenizer_directory(tmp_path):
    settings = {"chat_template": INST, "bos_token": {"content": "<s>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    chat = ChatTemplate.from_directory(tmp_path)
    assert chat.render("x") == "<s>[INST] x [/INST]" and chat.where.endswith(
        "tokenizer_config.json"
    )
    # Named templates: the default one.
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]
    settings["chat_template"] = named
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    assert ChatTemplate.from_directory(tmp_path).render("x").startswith("<|im_start|>user")
    # chat_template.jinja, where newer exports keep it, comes first.
    (tmp_path / "chat_template.jinja").write_text("Q: {{ messages[-1]['content'] }}\nA:")
    assert ChatTemplate.from_directory(tmp_path).render("x") == "Q: x\nA:"


def test_tool_sections_are_left_out_and_generation_marks_render_their_text():
    template = (
        "{% if tools is not none %}[TOOLS]{% endif %}{% if documents %}[DOCS]{% endif %}"
        "{% generation %}{{ messages[-1]['content'] }}{% endgeneration %}"
    )
    assert ChatTemplate(template).render("hi") == "hi"


def test_template_errors_name_where_the_template_came_from(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path} has no chat template \(neither chat_"):
        ChatTemplate.from_directory(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"chat_template.jinja: not a valid Jinja template"):
        ChatTemplate.from_directory(tmp_path)
    # A template's own refusal, at construction rather than at the first rollout.
    with pytest.raises(ValueError, match=r"failed to render \(System role not supported\)"):
        ChatTemplate(INST, system_prompt="Be brief.")
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x"}]}))
    with pytest.raises(ValueError, match=r"chat_template lists no template named 'default'"):
        ChatTemplate.from_directory(tmp_path)


def test_rendering_matches_transformers_apply_chat_template():
    """The same text as transformers renders (when it is installed: a benchmark extra)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1}, unk_token="<unk>")),
        bos_token="<s>",
    )
    # Sections for tools and documents left out, and assistant-turn marks for training.
    optional = (
        "{% if tools is not none %}[TOOLS]{% endif %}{% if documents %}[DOCS]{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    cases = ((CHATML, "Be brief."), (CHATML, ""), (INST, ""), (optional, "sys"))
    for template, system in cases:
        fast.chat_template = template
        chat = ChatTemplate(template, special_tokens={"bos_token": "<s>"}, system_prompt=system)
        want = fast.apply_chat_template(
            chat.messages("What is 2 + 3?"), tokenize=False, add_generation_prompt=True
        )
        assert chat.render("What is 2 + 3?") == want
    # A conversation (with an earlier exchange) is rendered as transformers renders it.
    conversation = [
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 3?"},
    ]
    for template in (CHATML, optional):
        fast.chat_template = template
        want = fast.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert ChatTemplate(template).render(conversation) == want
        # One that ends with a prefilled assistant message is continued, as TRL renders it:
        # also when the text is a piece of the template's closing markup, or ends in space.
        for text in ("The answer is ", "end", "im", "Let me think.\n"):
            prefilled = [*conversation, {"role": "assistant", "content": text}]
            want = fast.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)
            assert ChatTemplate(template).render(prefilled) == want, text
    trimmed = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim + '\n' }}{% endfor %}"
    )
    fast.chat_template = trimmed
    prefilled = [*conversation, {"role": "assistant", "content": "Let me think.\n"}]
    want = fast.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)
    assert ChatTemplate(trimmed).render(prefilled) == want
