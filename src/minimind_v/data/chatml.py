"""The ChatML template of MiniMind's tokenizers, in plain Python, and when a tokenizer's own template may use it.

Rendering through jinja costs ~0.5 ms, and a training sample renders 2 x turns + 1 times to find its loss spans:
on a 595K-record data set that alone is minutes. Templates that render system/user/assistant conversations as
CHAT_TEMPLATE does (ours, and the original MiniMind's, whose extra branches are for tools) are rendered here instead,
once checked on probe conversations; the up-front pass also spot-checks real records through jinja.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant"
"""The system turn CHAT_TEMPLATE writes when a conversation has none."""

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""The ChatML template of tokenizers trained by `minimind-v tokenizer`; renders as the original MiniMind's."""


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in plain Python (tests check it renders the same text as the template itself)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM
    body = messages[1:] if messages[0]["role"] == "system" else messages
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


_CHATML_PROBES = (
    [{"role": "user", "content": "?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": " two \n"}, {"role": "assistant", "content": "\n<think>r</think> b "}],
    [{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "问\t"}, {"role": "assistant", "content": "答<|im_end|>"}],
)
_chatml_like: dict[str, bool] = {}  # chat template -> renders every probe as CHAT_TEMPLATE does


def renders_as_chatml(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders system/user/assistant conversations as CHAT_TEMPLATE does (the
    original MiniMind's does: its extra branches are for tools), checked once per template on probe conversations
    with and without a generation prompt. Such a template is rendered by `render_chatml`, ~50x faster than jinja;
    `distrust_chatml` withdraws that for a template that a real record shows to differ."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if template == CHAT_TEMPLATE:
        return True
    if template not in _chatml_like:
        _chatml_like[template] = all(_jinja_matches(tokenizer, probe[:n], prompt)
                                     for probe in _CHATML_PROBES for n in range(1, len(probe) + 1)
                                     for prompt in (False, True))
    return _chatml_like[template]


def _jinja_matches(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> bool:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # a template that refuses a probe (strict role checks) is simply not taken for ChatML
        return False
    return text == render_chatml(messages, add_generation_prompt)


def jinja_agrees(tokenizer: Any, messages: list[dict[str, str]]) -> bool:
    """For a template taken for ChatML: whether jinja renders this conversation as `render_chatml` does (spot checks
    of real records)."""
    return _jinja_matches(tokenizer, messages, False)


def distrust_chatml(tokenizer: Any) -> None:
    _chatml_like[tokenizer.chat_template] = False


