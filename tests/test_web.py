"""The Gradio web UI in a real headless Chromium: upload, ask, watch the answer grow, ask again.

The browser tests run when CI=true or MINIMIND_BROWSER_TESTS=1 (then Chromium must be there); skipped
otherwise. MINIMIND_WEB_SCREENSHOT=PATH also saves a screenshot of the answered conversation there.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from minimind_v.infer.engine import Engine, SamplingParams
from test_3v_template import think_model_dir  # noqa: F401 (a fixture)

CHROMIUM = "/usr/bin/chromium"
SHOULD_RUN = os.environ.get("CI") == "true" or os.environ.get("MINIMIND_BROWSER_TESTS") == "1"

needs_browser = pytest.mark.skipif(not SHOULD_RUN,
                                   reason="browser test: set MINIMIND_BROWSER_TESTS=1 (CI=true runs it)")


class RecordingEngine:
    """The real engine, plus a record of what the page sent it; each delta is slowed so streaming is visible."""

    def __init__(self, engine: Engine, delay: float = 0.2) -> None:
        self.engine, self.calls, self.delay = engine, [], delay
        self.thinks = engine.thinks

    def chat(self, messages, images, params, on_text=None, open_thinking=False):
        call = SimpleNamespace(messages=copy.deepcopy(messages), n_images=len(images), params=params, text=None,
                               open_thinking=open_thinking)
        self.calls.append(call)

        def slowly(delta: str) -> None:
            time.sleep(self.delay)  # slow enough that a poll on a busy machine still sees several lengths
            on_text(delta)
        done = self.engine.chat(messages, images, params, on_text=slowly, open_thinking=open_thinking)
        call.text = done.text
        return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched(model_dir):
    """The page of a model, served on a free port; yields its url and the recording engine behind it."""
    from minimind_v.infer.web import build_app

    recorder = RecordingEngine(Engine.load(model_dir, device="cpu"))
    demo = build_app(recorder, title="minimind-v · tiny")
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=free_port(),
                                                   prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=demo.local_url, recorder=recorder)
    demo.close()


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    yield from launched(tiny_model_dir)


@pytest.fixture(scope="module")
def think_app(think_model_dir):
    yield from launched(think_model_dir)


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"browser tests were asked for but {CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def set_slider(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def ask(page, recorder: RecordingEngine, text: str, files: list[str] = ()) -> list[int]:
    """Send a message; return the lengths the last answer bubble showed while it was streaming."""
    calls_before = len(recorder.calls)
    if files:
        page.set_input_files("#ask input[type=file]", list(files))
        page.locator("#ask [data-testid='image']").or_(page.locator("#ask img")).first.wait_for()
    page.locator("#ask textarea").fill(text)
    page.locator("#ask textarea").press("Enter")
    seen, deadline = [], time.monotonic() + 120
    while not (len(recorder.calls) > calls_before and recorder.calls[-1].text is not None):
        assert time.monotonic() < deadline, "no answer within 2 minutes"
        bubbles = page.locator("[data-testid='bot']")
        if bubbles.count() > calls_before:
            seen.append(len(bubbles.nth(calls_before).inner_text()))
        time.sleep(0.02)
    page.wait_for_function("() => !document.querySelector('#ask textarea').disabled", timeout=30_000)
    return seen


@pytest.mark.browser
@needs_browser
def test_upload_ask_stream_and_follow_up(app, browser, tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (48, 40), (220, 20, 20)).save(picture)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(app.url)
    page.locator("#ask textarea").wait_for()
    set_slider(page, "temperature", "0")
    set_slider(page, "max-tokens", "24")

    grew = ask(page, app.recorder, "what color is it?", [str(picture)])
    assert len({n for n in grew if n > 0}) >= 3, f"the answer did not stream: lengths seen {grew}"
    ask(page, app.recorder, "and its shape?")

    first, second = app.recorder.calls[-2:]
    assert first.messages == [{"role": "user", "content": "<image>\nwhat color is it?"}] and first.n_images == 1
    assert second.messages == [first.messages[0], {"role": "assistant", "content": first.text},
                               {"role": "user", "content": "and its shape?"}]
    assert second.n_images == 1
    assert (second.params.temperature, second.params.max_new_tokens) == (0.0, 24)
    assert page.locator("[data-testid='bot']").count() == 2
    if os.environ.get("MINIMIND_WEB_SCREENSHOT"):
        page.screenshot(path=os.environ["MINIMIND_WEB_SCREENSHOT"], full_page=True)

    other_user = browser.new_page()  # a second browser session starts from nothing
    other_user.goto(app.url)
    other_user.locator("#ask textarea").wait_for()
    ask(other_user, app.recorder, "hello")
    assert app.recorder.calls[-1].messages == [{"role": "user", "content": "hello"}]
    assert app.recorder.calls[-1].n_images == 0


@pytest.mark.browser
@needs_browser
def test_the_think_box_is_there_for_a_think_model_only(app, think_app, browser):
    page = browser.new_page()
    page.goto(app.url)
    page.locator("#ask textarea").wait_for()
    assert page.locator("#open-thinking input[type=checkbox]").count() == 0 or \
        not page.locator("#open-thinking").is_visible()
    page.goto(think_app.url)
    page.locator("#ask textarea").wait_for()
    set_slider(page, "max-tokens", "8")
    ask(page, think_app.recorder, "what color?")
    page.locator("#open-thinking input[type=checkbox]").check()
    ask(page, think_app.recorder, "and its shape?")
    first, second = think_app.recorder.calls[-2:]
    assert (first.open_thinking, second.open_thinking) == (False, True)
    assert second.messages[1] == {"role": "assistant", "content": first.text}


def test_the_think_box_reaches_the_engine(tiny_model_dir, think_model_dir):
    import gradio as gr

    from minimind_v.infer.web import _respond, build_app

    for model_dir, thinks in ((tiny_model_dir, False), (think_model_dir, True)):
        recorder = RecordingEngine(Engine.load(model_dir, device="cpu"), delay=0)
        demo = build_app(recorder)
        box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "open-thinking")
        assert isinstance(box, gr.Checkbox) and box.visible is thinks and box.value is False
        assert any(box in fn.inputs for fn in demo.fns.values())  # an input of the answering event
    question = {"messages": [{"role": "user", "content": "what color"}], "images": []}
    params = SamplingParams(max_new_tokens=6)
    *_, (display, convo) = _respond(recorder, [], question, params, open_thinking=True)
    call = recorder.calls[-1]
    assert call.open_thinking is True
    assert call.text == recorder.engine.chat(question["messages"], [], params, open_thinking=True).text
    assert convo["messages"][-1] == {"role": "assistant", "content": call.text} == display[-1]
