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
"<image>\\nq"), in training and in prompts, so where a user puts an image cannot change its answer; a labelled
image line ("first: <image>") moves whole, its label with it.

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
import re
from dataclasses import dataclass
from typing import Any, Protocol

from minimind_v.constants import IGNORE_INDEX, IMAGE_MARKER
from minimind_v.data.chatml import CHAT_TEMPLATE, DEFAULT_SYSTEM, render_chatml, renders_as_chatml
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


_LABELLED = re.compile(rf"[^\n:：<]{{1,24}}[:：] ?{re.escape(IMAGE_MARKER)}")
"""A line that names its image: a label of a few words, a colon, the marker ("first: <image>", "第二张：<image>",
"Image 2:<image>")."""


def images_first(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each user turn's `<image>` markers moved before its text (images_before_text); an image-first turn is
    unchanged."""
    return [{**m, "content": images_before_text(m["content"])} if m["role"] == "user" and IMAGE_MARKER in m["content"]
            else m for m in messages]


def images_before_text(content: str) -> str:
    """The markers moved before the text, one per line, in their order; a labelled line ("first: <image>") moves
    whole, so that its label still says which image follows. The exported processor
    (convert/hf_template/processing_minimind_v.py) has its own copy: it runs without minimind_v."""
    front, text = [], []
    for line in content.split("\n"):
        if _LABELLED.fullmatch(line):
            front.append(line)
            continue
        front.extend([IMAGE_MARKER] * line.count(IMAGE_MARKER))
        rest = line.replace(IMAGE_MARKER, "")
        if rest or IMAGE_MARKER not in line:  # a line that held only markers goes with them
            text.append(rest)
    return "\n".join(front + text)


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
    """The tokenizer's chat template applied; a ChatML template in plain Python (`renders_as_chatml`), as a
    training sample renders 2 x turns + 1 times to find its loss spans.

    open_thinking goes to the template (None: not passed, the template's default); drop_empty_think removes
    every EMPTY_THINK from the rendered text, as the 3v recipe does to a whole training sample."""
    if open_thinking is None and renders_as_chatml(tokenizer):
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


@dataclass
class Pieces:
    """A conversation's rendered text cut where its loss mask changes and at its images, not yet tokenised: so many
    conversations can be tokenised in one call (`tokenize_many`)."""

    parts: list[tuple[str | None, bool]]
    """(text, supervised) in order; None text = one image placeholder run."""
    turn_cuts: list[int]
    """How many parts precede the end of each assistant turn."""

    @property
    def texts(self) -> list[str]:
        return [part for part, _ in self.parts if part is not None]


@dataclass
class FullEncoding:
    """A training conversation (or text) encoded whole; `truncate` makes it an EncodedSample for a max_seq_len."""

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]
    """Token index where each assistant turn ends (its end-of-turn token included); [len] for a text record."""
    image_starts: list[int]
    """Token index where each image's placeholder run starts."""
    is_text: bool = False

    def truncate(self, max_seq_len: int | None) -> EncodedSample:
        ids, labels = self.input_ids, self.labels
        if max_seq_len is not None and len(ids) > max_seq_len:
            if self.is_text:
                ids, labels = ids[:max_seq_len or None], labels[:max_seq_len or None]
                if len(ids) < 2:
                    raise BadSample("no_supervised_tokens", f"max_seq_len {max_seq_len} leaves under two tokens")
            else:
                fitting = [end for end in self.turn_ends if end <= max_seq_len]
                if not fitting:
                    raise BadSample("too_long", f"first answer ends at token {self.turn_ends[0]} > max_seq_len "
                                                f"{max_seq_len}")
                ids, labels = ids[:fitting[-1]], labels[:fitting[-1]]
        # At least one answer survives and its <|im_end|> is supervised, so the loss never divides by zero.
        return EncodedSample(ids, labels, bisect.bisect_left(self.image_starts, len(ids)))


def tokenize_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens added: what `tokenizer(texts, add_special_tokens=False)` gives, through
    the Rust tokenizer's batch call when there is one (a tenth of the cost per text)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in batch(texts, add_special_tokens=False)]


def _cut(text: str, cuts: list[int], supervised: list[tuple[int, int]], turn_ends: list[int]) -> Pieces:
    parts: list[tuple[str | None, bool]] = []
    parts_before = [0]  # parts before each cut
    for start, end in zip(cuts, cuts[1:]):
        is_supervised = any(s <= start and end <= e for s, e in supervised)
        for k, part in enumerate(text[start:end].split(IMAGE_MARKER)):
            if k:
                parts.append((None, False))
            if part:
                parts.append((part, is_supervised))
        parts_before.append(len(parts))
    return Pieces(parts, [parts_before[cuts.index(end)] for end in turn_ends])


def assemble(pieces: Pieces, text_ids: Any, image: ImageTokens) -> FullEncoding:
    """The ids and labels of `pieces`, given an iterator over the ids of its texts in order."""
    ids: list[int] = []
    labels: list[int] = []
    image_starts, part_ends = [], []
    for part, is_supervised in pieces.parts:
        if part is None:
            image_starts.append(len(ids))
            ids += [image.image_token_id] * image.image_token_len
            labels += [IGNORE_INDEX] * image.image_token_len
        else:
            part_ids = next(text_ids)
            ids += part_ids
            labels += part_ids if is_supervised else [IGNORE_INDEX] * len(part_ids)
        part_ends.append(len(ids))
    turn_ends = [part_ends[n - 1] if n else 0 for n in pieces.turn_cuts]
    return FullEncoding(ids, labels, turn_ends, image_starts)


def _add(parts: list[tuple[str | None, bool]], text: str, supervised: bool) -> None:
    for k, part in enumerate(text.split(IMAGE_MARKER)):
        if k:
            parts.append((None, False))
        if part:
            parts.append((part, supervised))


def _chatml_pieces(messages: list[dict[str, str]], add_generation_prompt: bool) -> Pieces:
    """What the rendering and span search below give for a ChatML template whose end-of-turn token is
    `<|im_end|>` (tested equal), built in one pass over the turns: the up-front pass over a large data set
    spends most of its time here."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM
    body = messages[1:] if messages[0]["role"] == "system" else messages
    parts: list[tuple[str | None, bool]] = []
    turn_cuts = []
    pending = f"<|im_start|>system\n{system}<|im_end|>\n"
    for message in body:
        if message["role"] == "assistant":
            _add(parts, pending + "<|im_start|>assistant\n", False)
            _add(parts, message["content"] + "<|im_end|>", True)
            _add(parts, "\n", False)
            turn_cuts.append(len(parts))
            pending = ""
        else:
            pending += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    _add(parts, pending + ("<|im_start|>assistant\n" if add_generation_prompt else ""), False)
    return Pieces(parts, turn_cuts)


def _pieces(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens, add_generation_prompt: bool,
            open_thinking: bool | None = None, drop_empty_think: bool = False) -> Pieces:
    if image.images_first:
        messages = images_first(messages)
    if (open_thinking is None and not drop_empty_think and renders_as_chatml(tokenizer)
            and tokenizer.eos_token == "<|im_end|>"):
        return _chatml_pieces(messages, add_generation_prompt)
    style = _Style(has_think_switch(tokenizer), drop_empty_think)
    text = style.render(tokenizer, messages, add_generation_prompt, open_thinking)
    spans, turn_ends = _assistant_spans(tokenizer, messages, text, style)
    cuts = sorted({0, len(text), *(p for span in spans for p in span), *turn_ends})
    return _cut(text, cuts, spans, turn_ends)


def conversation_pieces(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens, n_images: int = 0,
                        drop_empty_think: bool = False) -> Pieces:
    """A training conversation checked (roles, image markers) and cut, ready to tokenise; BadSample if unusable."""
    check_roles(messages)
    messages = with_image_markers(messages, n_images)
    return _pieces(tokenizer, messages, image, add_generation_prompt=False, drop_empty_think=drop_empty_think)


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], image: ImageTokens,
                        n_images: int = 0, max_seq_len: int | None = None,
                        drop_empty_think: bool = False) -> EncodedSample:
    """A training conversation -> ids and labels, truncated to max_seq_len by dropping whole trailing turns.

    drop_empty_think: the 3v recipe's edit, every empty think block removed from the rendered text (the answers
    are then learnt straight after their role header). Raises BadSample for bad roles, a marker mismatch, or
    too long (the first answer with its images does not fit).
    """
    pieces = conversation_pieces(tokenizer, messages, image, n_images, drop_empty_think)
    return assemble(pieces, iter(tokenize_many(tokenizer, pieces.texts)), image).truncate(max_seq_len)


def text_encoding(tokenizer: Any, text: str) -> FullEncoding:
    """A plain-text record encoded whole; BadSample if unusable."""
    if IMAGE_MARKER in text:
        raise BadSample("marker_mismatch", f"{IMAGE_MARKER} in a plain-text record")
    ids = (tokenize_many(tokenizer, [text])[0] if text else []) + [tokenizer.eos_token_id]
    if len(ids) < 2:
        raise BadSample("no_supervised_tokens", "empty text")
    return FullEncoding(ids, list(ids), [len(ids)], [], is_text=True)


def encode_text(tokenizer: Any, text: str, max_seq_len: int | None = None) -> EncodedSample:
    """A plain-text record (language-model stage): every token is supervised, closed by the end-of-text token."""
    return text_encoding(tokenizer, text).truncate(max_seq_len)


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
    pieces = _pieces(tokenizer, messages, image, add_generation_prompt=True, open_thinking=open_thinking)
    return assemble(pieces, iter(tokenize_many(tokenizer, pieces.texts)), image).input_ids


@dataclass
class _Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False
