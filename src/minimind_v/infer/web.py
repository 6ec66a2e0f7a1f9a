"""`minimind-v web`: a Gradio chat page; upload images, ask, watch the answer stream in, ask again.

The model is loaded once per process. Each browser session keeps its own conversation in a
`gr.State` (the turns the model sees, with `<image>` markers, and the image files in order), so
nothing is shared between users; the whole history goes to the model on every turn.
Generation runs one request at a time (the queue's concurrency limit of 1 per event).
A model whose chat template has a think block (minimind-3v) gets a "think first" box, `open_thinking`
for each answer it is ticked for; other models do not show it, as they have no think block to open.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from minimind_v.constants import IMAGE_MARKER
from minimind_v.errors import UserError
from minimind_v.infer.chat import ChatOptions, open_image, with_image_markers
from minimind_v.infer.engine import Engine, SamplingParams
from minimind_v.infer.hosting import check_port_free, served_name
from minimind_v.infer.streaming import Generation

INTRO = ("Attach one or more images with the clip, ask about them, and keep talking: every turn sends the "
         "whole conversation and all its images to the model.")


@dataclass
class WebOptions:
    model: str
    """Model directory."""
    adapter: str | None = None
    """LoRA adapter directory (peft format, e.g. a LoRA run's OUT/model/adapter) applied to the model; default: the
    model directory's own adapter/, when it has one."""
    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the page on this machine (0.0.0.0 exposes it to the network)."""
    port: int = 7860
    """TCP port."""
    served_model_name: str | None = None
    """The model's name in the page title; default: the model directory's name, or its parent's when the
    directory is called model (runs/quickstart/model -> quickstart)."""


def main(opts: WebOptions) -> int:
    check_port_free(opts.host, opts.port)
    engine = Engine.load(opts.model, adapter=opts.adapter)
    demo = build_app(engine, title=f"minimind-v · {served_name(opts.model, opts.served_model_name)}")
    try:
        demo.queue(default_concurrency_limit=1).launch(server_name=opts.host, server_port=opts.port)
    except OSError as err:  # taken between the check and Gradio's own bind
        raise UserError(f"--port {opts.port}: cannot listen on {opts.host} ({str(err).splitlines()[0]})") from None
    return 0


def new_conversation() -> dict[str, list]:
    """What one browser session remembers: the turns as the model sees them and the image files, in order."""
    return {"messages": [], "images": []}


def build_app(engine: Engine, title: str = "minimind-v") -> gr.Blocks:
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n{INTRO}")
        conversation = gr.State(new_conversation())
        chatbot = gr.Chatbot(label="conversation", height=460, elem_id="conversation")
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False, autofocus=True,
                                   placeholder="Ask about an image (attach it with the clip)…", elem_id="ask")
        with gr.Row():  # the sliders start at `minimind-v chat`'s defaults, so both answer alike
            temperature = gr.Slider(0.0, 1.5, value=ChatOptions.temperature, step=0.05,
                                    label="temperature (0 = greedy)", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=ChatOptions.top_p, step=0.05, label="top-p", elem_id="top-p")
            max_tokens = gr.Slider(8, 1024, value=ChatOptions.max_new_tokens, step=8, label="max new tokens",
                                   elem_id="max-tokens")
            think = gr.Checkbox(value=ChatOptions.open_thinking, label="think first (open_thinking)",
                                visible=engine.thinks, elem_id="open-thinking")
        clear = gr.Button("New conversation", variant="secondary")

        def respond(display: list, convo: dict, temp: float, p: float, limit: float,
                    thinking: bool) -> Iterator[tuple[list, dict]]:
            params = SamplingParams(max_new_tokens=int(limit), temperature=float(temp), top_p=float(p))
            yield from _respond(engine, display, convo, params, bool(thinking))

        asked = box.submit(_add_user_turn, [box, chatbot, conversation], [box, chatbot, conversation], queue=False)
        answered = asked.then(respond, [chatbot, conversation, temperature, top_p, max_tokens, think],
                              [chatbot, conversation])
        answered.then(lambda: gr.MultimodalTextbox(interactive=True), None, box, queue=False)
        clear.click(lambda: ([], new_conversation(), None), None, [chatbot, conversation, box], queue=False)
    return demo


def _add_user_turn(message: dict, display: list, convo: dict) -> tuple[Any, list, dict]:
    """Show the question (its images first) and record it with one `<image>` marker per new image."""
    text, files = (message or {}).get("text", "").strip(), list((message or {}).get("files", []))
    if not text and not files:
        return gr.MultimodalTextbox(value=None, interactive=True), display, convo
    paths = [f if isinstance(f, str) else f["path"] for f in files]
    display = display + [{"role": "user", "content": {"path": p}} for p in paths]
    display = display + [{"role": "user", "content": text or "(image)"}]
    turn = {"role": "user", "content": with_image_markers(text, len(paths))}
    convo = {"messages": convo["messages"] + [turn], "images": convo["images"] + paths}
    return gr.MultimodalTextbox(value=None, interactive=False), display, convo


def _respond(engine: Engine, display: list, convo: dict, params: SamplingParams,
             open_thinking: bool = False) -> Iterator[tuple[list, dict]]:
    """Stream the answer into the last chat bubble; on a refusal undo the question and say why."""
    if not convo["messages"] or convo["messages"][-1]["role"] != "user":
        return
    display = display + [{"role": "assistant", "content": ""}]
    try:
        images = [open_image(p) for p in convo["images"]]
        text = ""
        for text in _stream(engine, convo["messages"], images, params, open_thinking):
            display[-1] = {"role": "assistant", "content": text}
            yield display, convo
    except UserError as err:
        turn = convo["messages"][-1]
        n_new = turn["content"].count(IMAGE_MARKER)
        convo = {"messages": convo["messages"][:-1], "images": convo["images"][:len(convo["images"]) - n_new]}
        yield display[:-1], convo
        raise gr.Error(f"{err} (start a new conversation if it grew too long)") from None
    convo = {"messages": convo["messages"] + [{"role": "assistant", "content": text}], "images": convo["images"]}
    yield display, convo


def _stream(engine: Engine, messages: list[dict], images: list, params: SamplingParams,
            open_thinking: bool = False) -> Iterator[str]:
    """The answer so far, after each streamed delta; generation runs in a thread so this can yield.

    When the browser goes away Gradio closes this generator; the next delta then stops the engine.
    """
    generation = Generation(lambda on_text: engine.chat(messages, images, params, on_text=on_text,
                                                        open_thinking=open_thinking))
    threading.Thread(target=generation.run, name="minimind-v-web-generate", daemon=True).start()
    text = ""
    with generation:
        for piece in generation:
            text += piece
            yield text
    generation.result.result()  # re-raises the generation's error here, in Gradio's thread
