"""Conversations -> token ids and labels, through the tokenizer's own chat template.

Roles: an optional system turn first, then user and assistant alternating, starting with user and
ending with assistant (training) or user (a prompt). Anything else is a bad sample.

Loss mask (templates without a think block): exactly the tokens of each assistant turn's content plus its
closing end-of-turn token (`<|im_end|>`). Nothing else is supervised: not the system or user turns, not the role header
`<|im_start|>assistant\\n`, not the newline after `<|im_end|>`, not image placeholders. The spans
come from the template itself: rendering the conversation up to turn i with the generation prompt
gives where the answer starts, rendering it through turn i gives where it ends. The rendered text
is cut at every span boundary and tokenised piece by piece, so the prompt part of a training
sample is tokenised exactly as `build_prompt` tokenises it at inference (a think template's prompt ends
inside the supervised think block: there prompts and samples match the original's ids instead, see below).

Images: each `<image>` in the text becomes `image_token_len` copies of `image_token_id`, inserted
at the token level (never through BPE). A sample with images and no marker gets one "<image>\\n" per
image prepended to its first user turn (what the original does); any other count mismatch is bad.
A model with `images_first` has each user turn's markers moved before its text ("q\\n<image>" reads as
"<image>\\nq"), in training and in prompts, so where a user puts an image cannot change its answer.

The newer generation (minimind-3v): its template has a think block in every assistant turn
(`<think>\\n{reasoning}\\n</think>\\n\\n`, empty when there is none) and an `open_thinking` switch that only the
generation prompt reads (open: `<|im_start|>assistant\\n<think>\\n`; off: the empty block closed). Such a
template (`has_think_switch`) is masked as the 3v original masks it (minimind-v, dataset/lm_dataset.py,
`VLMDataset.generate_labels`): its labels start right after the `<|im_start|>assistant\\n` header and run
through the `<|im_end|>\\n` pair, so the think block, empty or not, and the newline after `<|im_end|>` are
learnt with the answer. Here the header is the template's own open generation prompt cut before its `<think>`.
`ChatAugmentation` holds that recipe's random edits of a training conversation. Ids and labels equal the
original's, but for one case: an empty think block dropped before an answer that starts with a space or tab.
The original tokenises the whole text, so BPE merges the header's newline with those spaces, its header search
then misses and that answer goes unlearnt; here the header keeps its own tokens, as at inference, and is learnt.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from typing import Any, Protocol

from minimind_v.constants import IGNORE_INDEX, IMAGE_MARKER
from minimind_v.data.formats import BadSample
from minimind_v.errors import UserError
from minimind_v.options import flag_name


class ImageTokens(Protocol):
    """Anything with the placeholder settings, e.g. a VLMConfig."""

    image_token_id: int
    image_token_len: int
    images_first: bool


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX where the loss does not look; aligned with input_ids (the model shifts)."""
    n_images: int
    """Images whose placeholders survived truncation: the first n_images of the sample's images."""


def check_roles(messages: list[dict[str, str]], for_prompt: bool = False) -> None:
    """system? (user assistant)+ for training; system? (user assistant)* user for a prompt."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    last = "user" if for_prompt else "assistant"
    if not body or body != expected or body[-1] != last:
        raise BadSample("bad_roles", f"roles {roles}: expected system? then user/assistant alternating, "
                                     f"ending with {last}")


def with_image_markers(messages: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Add the markers the original adds; BadSample when the text's markers do not match the images."""
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers == n_images:
        return messages
    if markers == 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        out = [dict(m) for m in messages]
        out[first_user]["content"] = f"{IMAGE_MARKER}\n" * n_images + out[first_user]["content"]
        return out
    raise BadSample("marker_mismatch", f"{markers} {IMAGE_MARKER} marker(s) for {n_images} image(s)")


def images_first(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each user turn's `<image>` markers moved before its text, one per line; an image-first turn is unchanged."""
    out = []
    for message in messages:
        n = message["content"].count(IMAGE_MARKER)
        if message["role"] == "user" and n:
            text = re.sub(rf"{re.escape(IMAGE_MARKER)}\n|\n?{re.escape(IMAGE_MARKER)}", "", message["content"])
            message = {**message, "content": f"{IMAGE_MARKER}\n" * n + text}
        out.append(message)
    return out


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


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""Where a think template's reasoning opens (its open generation prompt ends with it and a newline) and closes."""

EMPTY_THINK = "<think>\n\n</think>\n\n"
"""What a think template writes for an answer without reasoning; what the empty-think drop removes."""

_PROBE = [{"role": "user", "content": "?"}]
_think_switches: dict[str, bool] = {}  # chat template -> has_think_switch, so a template is probed once


def has_think_switch(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template is a think template (the 3v generation): `open_thinking` changes its
    generation prompt, which then opens a `<think>` block. Found by rendering one question both ways."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or template == CHAT_TEMPLATE:
        return False
    if template not in _think_switches:
        opened, closed = (tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True,
                                                         open_thinking=switch) for switch in (True, False))
        _think_switches[template] = opened != closed and THINK_OPEN in opened
    return _think_switches[template]


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False,
           open_thinking: bool | None = None, drop_empty_think: bool = False) -> str:
    """The tokenizer's chat template applied; our own template in plain Python, ~50x faster than through jinja
    (a training sample renders 2 x turns + 1 times to find its loss spans).

    open_thinking goes to the template (None: not passed, the template's default); drop_empty_think removes
    every EMPTY_THINK from the rendered text, as the 3v recipe does to a whole training sample."""
    if getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE:
        return render_chatml(messages, add_generation_prompt)
    switch = {} if open_thinking is None else {"open_thinking": open_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **switch)
    return text.replace(EMPTY_THINK, "") if drop_empty_think else text


@dataclass(frozen=True)
class _Style:
    """How a conversation is rendered: a think template or not, and whether its empty think blocks are dropped."""

    thinks: bool
    drop_empty_think: bool = False

    def render(self, tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False,
               open_thinking: bool | None = None) -> str:
        return render(tokenizer, messages, add_generation_prompt, open_thinking if self.thinks else None,
                      self.drop_empty_think)


def _answer_start(tokenizer: Any, history: list[dict[str, str]], text: str, style: _Style) -> int:
    """Where the supervised span of the answer after `history` starts in `text`.

    Our ChatML template: after its generation prompt `<|im_start|>assistant\\n`. A think template: after the role
    header alone (its open generation prompt cut before `<think>`), so the think block is supervised too."""
    prompt = style.render(tokenizer, history, add_generation_prompt=True, open_thinking=True)
    if style.thinks:
        prompt = prompt[:max(prompt.rfind(THINK_OPEN), 0)]
    if not prompt or not text.startswith(prompt):
        raise ValueError("the chat template renders a conversation's prefix differently from the whole; "
                         "cannot derive the loss mask")
    return len(prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str,
                     style: _Style) -> tuple[list[tuple[int, int]], list[int]]:
    """Character spans to supervise, and the character position where each assistant turn's text ends."""
    eos = tokenizer.eos_token
    spans, turn_ends = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _answer_start(tokenizer, messages[:i], text, style)
        through = style.render(tokenizer, messages[:i + 1])
        if not text.startswith(through):
            raise ValueError("the chat template renders a conversation's prefix differently from the whole; "
                             "cannot derive the loss mask")
        close = through.rfind(eos, start)
        if close < 0:
            raise ValueError(f"the chat template does not close an assistant turn with {eos!r}")
        end = close + len(eos)
        if style.thinks and through.startswith("\n", end):
            end += 1  # the 3v original's labels end with the pair `<|im_end|>\n`
        spans.append((start, end))
        turn_ends.append(len(through))
    return spans, turn_ends


def _tokenize_pieces(tokenizer: Any, text: str, cuts: list[int], supervised: list[tuple[int, int]],
                     image: ImageTokens) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tokenise text piece by piece between cuts; returns ids, labels, the token index of every cut, image starts."""
    pieces: list[tuple[str, bool]] = []  # (text, supervised); None text = one image placeholder run
    cut_piece: list[int] = []
    for start, end in zip(cuts, cuts[1:]):
        is_supervised = any(s <= start and end <= e for s, e in supervised)
        for k, part in enumerate(text[start:end].split(IMAGE_MARKER)):
            if k:
                pieces.append((None, False))
            if part:
                pieces.append((part, is_supervised))
        cut_piece.append(len(pieces))
    texts = [p for p, _ in pieces if p is not None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    ids, labels, image_starts, piece_ends = [], [], [], []
    for part, is_supervised in pieces:
        if part is None:
            image_starts.append(len(ids))
            ids += [image.image_token_id] * image.image_token_len
            labels += [IGNORE_INDEX] * image.image_token_len
        else:
            piece_ids = next(encoded)
            ids += piece_ids
            labels += piece_ids if is_supervised else [IGNORE_INDEX] * len(piece_ids)
        piece_ends.append(len(ids))
    cut_tokens = [0] + [piece_ends[n - 1] if n else 0 for n in cut_piece]  # token index of each cut
    return ids, labels, cut_tokens, image_starts


def _encode(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens, add_generation_prompt: bool,
            open_thinking: bool | None = None, drop_empty_think: bool = False
            ) -> tuple[list[int], list[int], list[int], list[int]]:
    """ids, labels, the token index where each assistant turn ends, the token index where each image starts."""
    if image.images_first:
        messages = images_first(messages)
    style = _Style(has_think_switch(tokenizer), drop_empty_think)
    text = style.render(tokenizer, messages, add_generation_prompt, open_thinking)
    spans, turn_ends = _assistant_spans(tokenizer, messages, text, style)
    cuts = sorted({0, len(text), *(p for span in spans for p in span), *turn_ends})
    ids, labels, cut_tokens, image_starts = _tokenize_pieces(tokenizer, text, cuts, spans, image)
    return ids, labels, [cut_tokens[cuts.index(end)] for end in turn_ends], image_starts


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens,
                        n_images: int = 0, max_seq_len: int | None = None,
                        drop_empty_think: bool = False) -> EncodedSample:
    """A training conversation -> ids and labels, truncated to max_seq_len by dropping whole trailing turns.

    drop_empty_think: the 3v recipe's edit, every empty think block removed from the rendered text (the answers
    are then learnt straight after their role header). Raises BadSample for bad roles, a marker mismatch, or
    too long (the first answer with its images does not fit).
    """
    check_roles(messages)
    messages = with_image_markers(messages, n_images)
    ids, labels, turn_ends, image_starts = _encode(tokenizer, messages, image, add_generation_prompt=False,
                                                   drop_empty_think=drop_empty_think)
    if max_seq_len is not None and len(ids) > max_seq_len:
        fitting = [end for end in turn_ends if end <= max_seq_len]
        if not fitting:
            raise BadSample("too_long", f"first answer ends at token {turn_ends[0]} > max_seq_len {max_seq_len}")
        ids, labels = ids[:fitting[-1]], labels[:fitting[-1]]
    # At least one answer survives and its <|im_end|> is supervised, so the loss never divides by zero.
    return EncodedSample(ids, labels, bisect.bisect_left(image_starts, len(ids)))


def encode_text(tokenizer: Any, text: str, max_seq_len: int | None = None) -> EncodedSample:
    """A plain-text record (language-model stage): every token is supervised, closed by the end-of-text token."""
    if IMAGE_MARKER in text:
        raise BadSample("marker_mismatch", f"{IMAGE_MARKER} in a plain-text record")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_seq_len] if max_seq_len else ids
    if len(ids) < 2:
        raise BadSample("no_supervised_tokens", "empty text")
    return EncodedSample(ids, list(ids), 0)


def build_prompt(tokenizer: Any, messages: list[dict[str, str]], image_token_id: int, image_token_len: int,
                 n_images: int | None = None, images_first: bool = False, open_thinking: bool = False) -> list[int]:
    """Inference prompt: the conversation so far (ending with a user turn) plus the template's generation prompt,
    `<|im_start|>assistant\\n` (a think template: with `<think>\\n` opened, or an empty block closed).

    `<image>` markers expand as in training. With n_images given and no marker in the text, the markers are
    prepended to the first user turn, as in training. Raises BadSample on bad roles or a marker mismatch, and
    ValueError for open_thinking with a template that has no think block.
    """
    if open_thinking and not has_think_switch(tokenizer):
        raise ValueError("open_thinking: the chat template has no think block to open")
    check_roles(messages, for_prompt=True)
    if n_images is not None:
        messages = with_image_markers(messages, n_images)
    image = _Placeholder(image_token_id, image_token_len, images_first)
    return _encode(tokenizer, messages, image, add_generation_prompt=True, open_thinking=open_thinking)[0]


@dataclass
class _Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False


SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
"""The system turns the 3v recipe picks from (the original's list, in its order)."""


@dataclass
class ChatAugmentation:
    """The 3v recipe's random edits of a training conversation, both off by default (each sample as written).

    The original (minimind-v, dataset/lm_dataset.py; `VLMDataset.__getitem__`, pretrain and SFT alike) makes two:
    `pre_processing_chat` puts a system turn drawn uniformly from SYSTEM_PROMPTS before a conversation that has
    none, with probability 0.2 (tool-use conversations are left alone; our formats carry no tools), and
    `post_processing_chat` deletes every empty think block from the rendered text with probability 0.8 (it keeps
    them with its `empty_think_ratio` 0.2), so most answers are learnt without one. `open_thinking` is never
    passed in training: it only changes the generation prompt. The original draws from the process-wide
    `random` afresh each epoch; here each record's draws come from (seed, its line) once, so the up-front
    pass's lengths, which grouped and packed batches rely on, stay exact and a rerun sees the same samples.
    """

    system_prompt_ratio: float = 0.0
    """Share of conversations without a system turn that get one of the 3v recipe's system prompts (its value: 0.2)."""
    drop_empty_think_ratio: float = 0.0
    """Share of conversations whose empty think blocks are removed before training (the 3v recipe's value: 0.8)."""

    def check(self, tokenizer: Any) -> None:
        """One line naming the flag for a ratio out of [0, 1], or an empty-think drop the template cannot do."""
        for name in ("system_prompt_ratio", "drop_empty_think_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{flag_name(name)} {getattr(self, name)}: must be between 0 and 1")
        if self.drop_empty_think_ratio and not has_think_switch(tokenizer):
            raise UserError(f"{flag_name('drop_empty_think_ratio')} {self.drop_empty_think_ratio}: the tokenizer's "
                            "chat template writes no think block (a 2025-generation tokenizer); leave it at 0")

    def draw(self, messages: list[dict[str, str]], seed: int, record: str | int) -> tuple[list[dict[str, str]], bool]:
        """A record's conversation with its drawn system turn, and whether its empty think blocks go; `record`
        names the record (its line), so the draws are the same on every pass."""
        if not (self.system_prompt_ratio or self.drop_empty_think_ratio):
            return messages, False
        rng = random.Random(f"minimind-v augmentation {seed} {record}")  # a str seed hashes the same in every process
        # All three draws always, so that changing one ratio never changes what the other one picks.
        add_system, system, drop = rng.random(), rng.choice(SYSTEM_PROMPTS), rng.random()
        if add_system < self.system_prompt_ratio and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return messages, drop < self.drop_empty_think_ratio
