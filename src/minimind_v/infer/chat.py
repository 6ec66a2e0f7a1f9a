"""`minimind-v chat`: talk to a model about images, one question or a multi-turn session in the terminal.

Images go with the first message of a conversation, as in training: `--image` attaches them to the first
one, and `/image PATH` in the middle of a conversation starts a new conversation about that image (the
history is dropped, and the line says so). `/reset` forgets the conversation and attaches the `--image`
images again. A message gets one `<image>` line per image put before it, unless it already has the
markers, typed where the images should go. `--open-thinking` lets a model with a think block (minimind-3v)
reason before it answers; its reasoning is printed as it comes, up to `</think>`, then the answer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from minimind_v.constants import IMAGE_MARKER
from minimind_v.errors import UserError
from minimind_v.infer.engine import Completion, Engine, SamplingParams

HELP = ("commands: /image PATH (attach an image to your next message; in a conversation, start a new one with it), "
        "/reset (forget the conversation; --image images go with the next message), /exit or Ctrl-D")


@dataclass
class ChatOptions:
    model: str
    """Model directory."""
    adapter: str | None = None
    """LoRA adapter directory (peft format, e.g. a LoRA run's OUT/model/adapter) applied to the model; default: the
    model directory's own adapter/, when it has one."""
    image: list[str] = field(default_factory=list)
    """Image to ask about (repeat for several); in the interactive mode it goes with the first message."""
    prompt: str | None = None
    """Ask this one question, print the answer and exit; without it, an interactive session starts."""
    greedy: bool = False
    """Always pick the most likely token (same answer every time); overrides --temperature."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 0.85
    """Nucleus sampling: draw only from the most likely tokens whose probabilities sum to this."""
    max_new_tokens: int = 256
    """Longest answer, in tokens."""
    json: bool = False
    """One-shot mode: print one JSON object (text, finish_reason, token counts) instead of streaming."""
    open_thinking: bool = False
    """Let the model reason in its think block before answering (models whose chat template has one: minimind-3v)."""


def main(opts: ChatOptions) -> int:
    params = SamplingParams(max_new_tokens=opts.max_new_tokens, temperature=0.0 if opts.greedy else opts.temperature,
                            top_p=opts.top_p)
    params.validate()
    images = [open_image(p) for p in opts.image]
    engine = Engine.load(opts.model, adapter=opts.adapter)
    engine.check_open_thinking(opts.open_thinking, "--open-thinking")
    if opts.prompt is not None:
        return _one_shot(engine, opts.prompt, images, params, opts.json, opts.open_thinking)
    _Session(engine, params, images, opts.open_thinking).run()
    return 0


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from disk (converted as in training), or a one-line UserError naming the file."""
    from minimind_v.data.formats import BadSample
    from minimind_v.data.images import load_image

    try:
        return load_image(Path(path))
    except BadSample as err:
        raise UserError(err.detail) from None  # names the file


def with_image_markers(text: str, n_images: int) -> str:
    """One `<image>` line per attached image before the text, as the training data has it, unless the text
    has markers of its own (then they say where the images go, and their count is checked when asked)."""
    return text if IMAGE_MARKER in text else f"{IMAGE_MARKER}\n" * n_images + text


def _one_shot(engine: Engine, prompt: str, images: list[Image.Image], params: SamplingParams, as_json: bool,
              open_thinking: bool) -> int:
    messages = [{"role": "user", "content": with_image_markers(prompt, len(images))}]
    if as_json:
        done = engine.chat(messages, images, params, open_thinking=open_thinking)
        print(json.dumps(_as_dict(done), ensure_ascii=False))
    else:
        engine.chat(messages, images, params, on_text=_print_delta, open_thinking=open_thinking)
        print()
    return 0


def _as_dict(done: Completion) -> dict:
    return {"text": done.text, "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}


def _print_delta(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


class _Session:
    """The interactive loop: every turn sends the whole history and every image attached so far."""

    def __init__(self, engine: Engine, params: SamplingParams, images: list[Image.Image],
                 open_thinking: bool = False) -> None:
        self.engine = engine
        self.params = params
        self.open_thinking = open_thinking
        self.given = list(images)  # from --image: attached again after /reset
        self.messages: list[dict] = []
        self.images: list[Image.Image] = []
        self.pending = list(images)  # attached, waiting for the next user message

    def run(self) -> None:
        print(HELP)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            line = line.strip()
            if line in ("/exit", "/quit"):
                return
            if line:
                self._handle(line)

    def _handle(self, line: str) -> None:
        if line == "/reset":
            self.messages, self.images, self.pending = [], [], list(self.given)
            kept = f"; the {len(self.given)} --image image(s) go with your next message" if self.given else ""
            print(f"(conversation cleared{kept})")
        elif line.startswith("/image"):
            self._attach(line.removeprefix("/image").strip())
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}")
        else:
            self._ask(line)

    def _attach(self, path: str) -> None:
        if not path:
            print("usage: /image PATH")
            return
        try:
            image = open_image(path)
        except UserError as err:
            print(f"error: {err}")
            return
        if self.messages:
            self.messages, self.images, self.pending = [], [], []
            print("(new conversation: the history is cleared, as images go with a conversation's first message)")
        self.pending.append(image)
        print(f"(image {path} will go with your next message)")

    def _ask(self, text: str) -> None:
        turn = {"role": "user", "content": with_image_markers(text, len(self.pending))}
        images = self.images + self.pending
        sys.stdout.write("model> ")
        try:
            done = self.engine.chat(self.messages + [turn], images, self.params, on_text=_print_delta,
                                    open_thinking=self.open_thinking)
        except UserError as err:  # e.g. the history outgrew the model's context: keep the session alive
            print(f"\nerror: {err} (try /reset)")
            return
        print()
        # The whole text goes back, reasoning and `</think>` included: a think template renders it as the block.
        self.messages += [turn, {"role": "assistant", "content": done.text}]
        self.images, self.pending = images, []
