"""Conversations -> token ids and labels, through the tokenizer's own chat template.

Roles: an optional system turn first, then user and assistant alternating, starting with user and
ending with assistant (training) or user (a prompt). Anything else is a bad sample.

Loss mask: exactly the tokens of each assistant turn's content plus its closing end-of-turn token
(`<|im_end|>`). Nothing else is supervised: not the system or user turns, not the role header
`<|im_start|>assistant\\n`, not the newline after `<|im_end|>`, not image placeholders. The spans
come from the template itself: rendering the conversation up to turn i with the generation prompt
gives where the answer starts, rendering it through turn i gives where it ends. The rendered text
is cut at every span boundary and tokenised piece by piece, so the prompt part of a training
sample is tokenised exactly as `build_prompt` tokenises it at inference.

Images: each `<image>` in the text becomes `image_token_len` copies of `image_token_id`, inserted
at the token level (never through BPE). A sample with images and no marker gets one "<image>\\n" per
image prepended to its first user turn (what the original does); any other count mismatch is bad.
A model with `images_first` has each user turn's markers moved before its text ("q\\n<image>" reads as
"<image>\\nq"), in training and in prompts, so where a user puts an image cannot change its answer.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Protocol

from minimind_v.constants import IGNORE_INDEX, IMAGE_MARKER
from minimind_v.data.formats import BadSample



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


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied; our own template in plain Python, ~50x faster than through jinja
    (a training sample renders 2 x turns + 1 times to find its loss spans)."""
    if getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE:
        return render_chatml(messages, add_generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> tuple[list[tuple[int, int]],
                                                                                          list[int]]:
    """Character spans to supervise, and the character position where each assistant turn's text ends."""
    eos = tokenizer.eos_token
    spans, turn_ends = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template renders a conversation's prefix differently from the whole; "
                             "cannot derive the loss mask")
        close = through.rfind(eos, len(before))
        if close < 0:
            raise ValueError(f"the chat template does not close an assistant turn with {eos!r}")
        spans.append((len(before), close + len(eos)))
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


def _encode(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens,
            add_generation_prompt: bool) -> tuple[list[int], list[int], list[int], list[int]]:
    """ids, labels, the token index where each assistant turn ends, the token index where each image starts."""
    if image.images_first:
        messages = images_first(messages)
    text = render(tokenizer, messages, add_generation_prompt)
    spans, turn_ends = _assistant_spans(tokenizer, messages, text)
    cuts = sorted({0, len(text), *(p for span in spans for p in span), *turn_ends})
    ids, labels, cut_tokens, image_starts = _tokenize_pieces(tokenizer, text, cuts, spans, image)
    return ids, labels, [cut_tokens[cuts.index(end)] for end in turn_ends], image_starts


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens,
                        n_images: int = 0, max_seq_len: int | None = None) -> EncodedSample:
    """A training conversation -> ids and labels, truncated to max_seq_len by dropping whole trailing turns.

    Raises BadSample for bad roles, a marker mismatch, or too long (the first answer with its images does
    not fit).
    """
    check_roles(messages)
    messages = with_image_markers(messages, n_images)
    ids, labels, turn_ends, image_starts = _encode(tokenizer, messages, image, add_generation_prompt=False)
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
                 n_images: int | None = None, images_first: bool = False) -> list[int]:
    """Inference prompt: the conversation so far (ending with a user turn) plus `<|im_start|>assistant\\n`.

    `<image>` markers expand as in training. With n_images given and no marker in the text, the markers are
    prepended to the first user turn, as in training. Raises BadSample on bad roles or a marker mismatch.
    """
    check_roles(messages, for_prompt=True)
    if n_images is not None:
        messages = with_image_markers(messages, n_images)
    image = _Placeholder(image_token_id, image_token_len, images_first)
    return _encode(tokenizer, messages, image, add_generation_prompt=True)[0]


@dataclass
class _Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False
