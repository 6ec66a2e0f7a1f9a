"""The generation engine: the only sampling code in the project.

chat, web, serve and eval all call `Engine`. One call to `generate` runs a batch of prompts
(left-padded, with an attention mask) through one prefill and a KV-cached decode loop, and
samples each row with the same `SamplingParams`: greedy, temperature, top-k, top-p and a
CTRL-style repetition penalty. A row stops on an end token, on a stop string (the text is cut
before it, even when it spans tokens) or at `max_new_tokens`.

Streaming: `on_token(row, delta)` gets text deltas whose concatenation is the row's final text.
A delta never ends inside a multi-byte UTF-8 character, and text that might be the start of a
stop string is held back until it is known not to be one.

Thinking: a model whose chat template has a think block (the 3v generation, `thinks`) answers
with its empty block closed in the prompt, or, with `open_thinking`, reasons first: the prompt
then ends with `<think>\n` and the answer text is the reasoning, `</think>`, and the reply. Asking
that of a model without a think block is a UserError (turning it off is what such a model does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from minimind_v.constants import END_TOKENS
from minimind_v.devices import resolve_device
from minimind_v.errors import UserError


@dataclass
class SamplingParams:
    """How to pick each next token."""

    max_new_tokens: int = 256
    """Most tokens to generate per prompt (the end token not counted)."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 means no limit."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities sum to p (nucleus)."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already present by this; 1 means off."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer; the text is cut before the first one."""
    seed: int | None = None
    """Seed of this call's random generator; the same seed gives the same sample."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")


@dataclass
class Completion:
    """One generated answer."""

    text: str
    """The answer, cut before a stop string; end tokens excluded."""
    token_ids: list[int]
    """Generated tokens (end token excluded; with a stop string, up to the token that completed it)."""
    finish_reason: str
    """"stop" (end token or stop string) or "length" (max_new_tokens reached)."""
    prompt_tokens: int
    """Tokens in the prompt, image placeholders included."""
    completion_tokens: int
    """Tokens generated, the end token included when one was produced."""


TokenCallback = Callable[[int, str], None]


class Engine:
    """A loaded model with its tokenizer and image processor, ready to answer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = model.cfg
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        vocab = tokenizer.get_vocab()
        self.end_token_ids = frozenset(vocab[t] for t in END_TOKENS if t in vocab)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device | None = None,
             adapter: str | Path | None = None) -> "Engine":
        """Read a model directory: weights, tokenizer and the vision tower's image processor; with `adapter`, a
        LoRA adapter directory applied on top (default: the model directory's own adapter/, a LoRA run's).
        The one loader of chat, web, serve and eval."""
        from minimind_v.data.tokenizer import load_tokenizer
        from minimind_v.modeldir import MiniMindVLM, load_image_processor, own_adapter

        device = resolve_device(device) if not isinstance(device, torch.device) else device
        adapter = adapter if adapter is not None else own_adapter(model_dir)
        model = MiniMindVLM.from_pretrained(model_dir, adapter)  # UserErrors name the directory at fault
        return cls(model, load_tokenizer(model_dir), load_image_processor(model_dir, model.cfg), device)

    def chat(self, messages: list[dict], images: list[Image.Image], params: SamplingParams,
             on_text: Callable[[str], None] | None = None, open_thinking: bool = False) -> Completion:
        """Answer the last user turn of `messages`; each `<image>` in their content takes the next image.

        With no `<image>` marker at all, one per image is put before the first user turn (as in training).
        """
        callback = (lambda _row, delta: on_text(delta)) if on_text is not None else None
        prompt = self.prompt(messages, len(images), open_thinking)
        return self.generate([prompt], [images], params, callback)[0]

    def inputs(self, messages: list[dict], images: list[Image.Image],
               open_thinking: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's inputs for a conversation: input_ids (1, T) and pixel_values (N, 3, H, W) or None."""
        input_ids = torch.tensor([self.prompt(messages, len(images), open_thinking)], device=self.device)
        return input_ids, self.encode_images(images) if images else None

    @property
    def thinks(self) -> bool:
        """The chat template has a think block that `open_thinking` opens (the 3v generation)."""
        from minimind_v.data.template import has_think_switch

        return has_think_switch(self.tokenizer)

    def check_open_thinking(self, open_thinking: bool, name: str = "open_thinking") -> None:
        """A one-line UserError naming `name` (the caller's flag or field) when thinking is asked of a model
        without a think block."""
        if open_thinking and not self.thinks:
            raise UserError(f"{name}: this model's chat template has no think block to open (a 2025-generation "
                            "tokenizer); turn it off")

    def prompt(self, messages: list[dict], n_images: int, open_thinking: bool = False) -> list[int]:
        """The prompt `chat` would run, checked: roles, markers against images, and room for one new token.

        A UserError here is the caller's to report before anything is generated (or streamed)."""
        from minimind_v.data.formats import BadSample
        from minimind_v.data.template import build_prompt

        self.check_open_thinking(open_thinking)
        try:
            prompt = build_prompt(self.tokenizer, messages, self.config.image_token_id, self.config.image_token_len,
                                  n_images=n_images, images_first=self.config.images_first,
                                  open_thinking=open_thinking)
        except BadSample as err:  # wrong role order, or <image> markers that do not match the images
            raise UserError(err.detail) from None
        self._room_left([prompt], 1)
        return prompt

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], images: list[list[Image.Image]] | None,
                 params: SamplingParams, on_token: TokenCallback | None = None) -> list[Completion]:
        """Complete each prompt (token ids with placeholder runs); `images[i]` fills prompt i's runs."""
        params.validate()
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise UserError("empty prompt")
        max_new = self._room_left(prompts, params.max_new_tokens)
        pixel_values = self._pixel_values(prompts, images)
        input_ids, prompt_mask = self._left_pad(prompts)
        batch, prompt_len = input_ids.shape
        # One mask for the whole call; each decode step reads a longer view of it instead of re-building it.
        mask = torch.ones(batch, prompt_len + max_new, dtype=torch.long, device=self.device)
        mask[:, :prompt_len] = prompt_mask
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(self, i, len(p), params, max_new, on_token) for i, p in enumerate(prompts)]
        sampler = _Sampler(params, self._seen_tokens(prompts, params), self.device)

        out = self.model(input_ids, pixel_values=pixel_values, attention_mask=prompt_mask,
                         position_ids=positions, use_cache=True, logits_to_keep=1)
        next_position = positions[:, -1:] + 1
        for step in range(max_new):
            tokens = sampler.next(out.logits[:, -1])
            for row, token in zip(rows, tokens.tolist()):
                row.push(token)
            if all(row.finished for row in rows):
                break
            out = self.model(tokens[:, None], attention_mask=mask[:, :prompt_len + step + 1],
                             position_ids=next_position, past_key_values=out.past_key_values, use_cache=True)
            next_position = next_position + 1
        return [row.completion() for row in rows]

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, H, W) pixel values on the engine's device, preprocessed as in training."""
        return self.image_processor.pixel_values(images).to(self.device, self._float_dtype())

    def _float_dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def _room_left(self, prompts: list[list[int]], wanted: int) -> int:
        limit = self.config.lm.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise UserError(f"prompt of {longest} tokens does not fit the model's {limit} positions")
        return min(wanted, limit - longest)

    def _pixel_values(self, prompts: list[list[int]], images: list[list[Image.Image]] | None) -> torch.Tensor | None:
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(images)} image lists")
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            runs = prompt.count(self.config.image_token_id) / self.config.image_token_len
            if runs != len(imgs):
                raise UserError(f"prompt {i} has {runs:g} image placeholder runs but {len(imgs)} images were given")
        flat = [img for imgs in images for img in imgs]  # placeholder order, row by row
        return self.encode_images(flat) if flat else None

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _seen_tokens(self, prompts: list[list[int]], params: SamplingParams) -> torch.Tensor | None:
        if params.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(len(prompts), self.config.lm.vocab_size, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=self.device)] = True
        return seen


class _Sampler:
    """Logits (B, V) -> next tokens (B,), all on-device tensor work (no Python loop over the vocabulary)."""

    def __init__(self, params: SamplingParams, seen: torch.Tensor | None, device: torch.device) -> None:
        self.params = params
        self.seen = seen
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def next(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            tokens = self._sample(logits / p.temperature)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token once the more likely ones already reach top_p; the most likely one always stays.
            drop = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


class _Row:
    """One prompt's answer as it grows: tokens, text, stop strings and streamed deltas."""

    def __init__(self, engine: Engine, index: int, prompt_tokens: int, params: SamplingParams,
                 max_new: int, on_token: TokenCallback | None) -> None:
        self.tokenizer = engine.tokenizer
        self.end_token_ids = engine.end_token_ids
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.stops = params.stop
        self.max_new = max_new
        self.on_token = on_token
        # Text is decoded step by step only when someone reads it before the end.
        self.incremental = bool(self.stops) or on_token is not None
        self.token_ids: list[int] = []
        self.generated = 0
        self.text = ""
        self.searched = 0  # characters of self.text already searched for stop strings
        self.sent = 0  # characters of self.text already handed to on_token
        self.prefix_offset = 0  # tokens decoded as context for the next piece (see _decode_new)
        self.read_offset = 0  # tokens whose text is already in self.text
        self.finished = False
        self.finish_reason = "length"

    def push(self, token: int) -> None:
        if self.finished:
            return
        self.generated += 1
        if token in self.end_token_ids:
            self._finish("stop")
            return
        self.token_ids.append(token)
        if self.incremental:
            self.text += self._decode_new()
            if self._cut_at_stop():
                self._finish("stop", flush=False)
                return
            self._send(len(self.text) - self._possible_stop_prefix())
        if self.generated >= self.max_new:
            self._finish("length")

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.finish_reason, self.prompt_tokens, self.generated)

    def _finish(self, reason: str, flush: bool = True) -> None:
        """flush: add the text still held back (an incomplete character, a possible stop-string start)."""
        self.finished = True
        self.finish_reason = reason
        if not self.incremental:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            return
        if flush:
            self.text += self._decode_new(final=True)
            if self._cut_at_stop():
                self.finish_reason = "stop"
        self._send(len(self.text))

    def _decode_new(self, final: bool = False) -> str:
        """Text added by the tokens after read_offset, or "" while it ends inside a UTF-8 character.

        Decoding from a few tokens earlier (prefix_offset) keeps tokenizers that change a piece's
        first character by context (leading spaces) right; byte-level pieces that stop mid-character
        decode to U+FFFD, so those are held until the next token completes them.
        """
        decode = self.tokenizer.decode
        before = decode(self.token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return after[len(before):]

    def _cut_at_stop(self) -> bool:
        # A stop string not found before can only end in the new text: search its window only.
        start = max(0, self.searched - max((len(s) for s in self.stops), default=0) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        self.searched = len(self.text)
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _possible_stop_prefix(self) -> int:
        """Length of the longest tail of the text that could grow into a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stops), default=0) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _send(self, upto: int) -> None:
        if self.on_token is not None and upto > self.sent:
            self.on_token(self.index, self.text[self.sent:upto])
            self.sent = upto
