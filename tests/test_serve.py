"""The OpenAI-compatible API, driven by the official `openai` client against a live uvicorn server."""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image

from minimind_v.infer.engine import Engine, SamplingParams
from minimind_v.infer.serve import ServeOptions, create_app
from minimind_v.infer.serve_schema import AnswerDeltas, split_reasoning
from minimind_v.infer.streaming import Cancelled
from test_3v_template import think_model_dir  # noqa: F401 (a fixture)

LIMITS = dict(max_request_bytes=300_000, max_image_bytes=60_000, max_image_pixels=250_000, max_tokens_limit=40)


class LiveServer:
    """uvicorn in a thread on a free loopback port, stopped on close()."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(engine, tiny_model_dir):
    live = LiveServer(create_app(engine, ServeOptions(model=str(tiny_model_dir), **LIMITS), model_name="tiny"))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, data: bytes) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                        {"type": "text", "text": text}]}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_text_completion_is_the_engines_answer(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the red square"}],
                                           max_tokens=12, temperature=0)
    direct = engine.chat([{"role": "user", "content": "the red square"}], [], SamplingParams(max_new_tokens=12))
    assert reply.choices[0].message.content == direct.text
    assert reply.choices[0].finish_reason == direct.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (direct.prompt_tokens,
                                                                          direct.completion_tokens)
    assert reply.usage.total_tokens == direct.prompt_tokens + direct.completion_tokens
    assert reply.id.startswith("chatcmpl-") and reply.model == "tiny" and reply.created > 0


def test_image_completion_is_the_engines_answer(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=[image_message("what color", png())],
                                           max_tokens=12, temperature=0)
    image = Image.open(io.BytesIO(png()))
    direct = engine.chat([{"role": "user", "content": "<image>\nwhat color"}], [image],
                         SamplingParams(max_new_tokens=12))
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.prompt_tokens == direct.prompt_tokens  # the placeholder run is counted
    other = client.chat.completions.create(model="tiny", messages=[image_message("what color", png((0, 0, 255)))],
                                           max_tokens=12, temperature=0)
    assert other.choices[0].message.content != reply.choices[0].message.content


def test_streaming_gives_the_same_text_then_finish_usage_and_done(client, server):
    messages = [image_message("describe", png()), {"role": "assistant", "content": "a square"},
                {"role": "user", "content": "and the colour?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                     json={"messages": messages, "max_tokens": 4, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_stop_seed_and_max_completion_tokens(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "a blue circle"}])
    sampled = [client.chat.completions.create(**ask, max_tokens=20, temperature=1.0, seed=5) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
    full = client.chat.completions.create(**ask, max_completion_tokens=20, temperature=0).choices[0].message.content
    assert len(full) > 4
    cut = client.chat.completions.create(**ask, max_tokens=20, temperature=0, stop=[full[2:4], "never"])
    assert cut.choices[0].message.content == full[:full.index(full[2:4])]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(**ask, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3


def test_parallel_requests_each_get_their_own_answer(client):
    prompts = [f"shape {i} is on the left" for i in range(6)]

    def ask(prompt: str) -> str:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=10, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    assert together == [ask(p) for p in prompts]


def bad(server, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, **kwargs)


def chat_body(**overrides) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **overrides}


@pytest.mark.parametrize("case, request_kwargs, status, code", [
    ("invalid json", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
    ("schema", dict(json={"messages": "hello"}), 400, "invalid_value"),
    ("wrong type", dict(json=chat_body(temperature="hot")), 400, "invalid_value"),
    ("unknown role", dict(json=chat_body(messages=[{"role": "wizard", "content": "hi"}])), 400, "invalid_role"),
    ("empty messages", dict(json=chat_body(messages=[])), 400, "empty_messages"),
    ("bad base64", dict(json=chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}]}])),
     400, "invalid_base64"),
    ("not an image", dict(json=chat_body(messages=[image_message("x", b"plain text, no pixels")])),
     400, "invalid_image"),
    ("image bytes", dict(json=chat_body(messages=[image_message("x", bytes(70_000))])), 400, "image_too_large"),
    ("image pixels", dict(json=chat_body(messages=[image_message("x", png(size=(600, 600)))])),
     400, "image_too_large"),
    ("remote url", dict(json=chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])),
     400, "remote_images_disabled"),
    ("file url", dict(json=chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])), 400, "invalid_image_url"),
    ("max tokens", dict(json=chat_body(max_tokens=41)), 400, "max_tokens_too_large"),
    ("n", dict(json=chat_body(n=2)), 400, "unsupported_value"),
    ("marker in text", dict(json=chat_body(messages=[{"role": "user", "content": "<image> hi"}])),
     400, "invalid_value"),
    ("roles out of order", dict(json=chat_body(messages=[{"role": "assistant", "content": "hi"}])),
     400, "invalid_prompt"),
    ("body too large", dict(json=chat_body(messages=[{"role": "user", "content": "x" * 400_000}])),
     413, "request_too_large"),
])
def test_bad_requests_get_openai_style_4xx(server, case, request_kwargs, status, code):
    response = bad(server, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


def test_unknown_route_is_openai_style_404_and_server_survives(server, client):
    response = httpx.get(f"{server.url}/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).model == "tiny"


class GatedEngine:
    """Holds every generation until the test opens the gate: makes 'busy' deterministic."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.entered, self.gate = engine, threading.Event(), threading.Event()

    def generate(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        return self.engine.generate(*args, **kwargs)

    def prompt(self, *args, **kwargs):
        return self.engine.prompt(*args, **kwargs)


def test_full_queue_answers_429(engine, tiny_model_dir):
    gated = GatedEngine(engine)
    live = LiveServer(create_app(gated, ServeOptions(model=str(tiny_model_dir), max_queue=1), model_name="tiny"))
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(bad, live, json=chat_body())
            assert gated.entered.wait(30)  # the worker holds the first request
            waiting = pool.submit(bad, live, json=chat_body())
            deadline = time.monotonic() + 30
            while httpx.get(f"{live.url}/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = bad(live, json=chat_body())
            refused_stream = bad(live, json=chat_body(stream=True))
            gated.gate.set()
            assert running.result().status_code == waiting.result().status_code == 200
        assert refused.status_code == refused_stream.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        gated.gate.set()
        live.close()


def test_the_model_is_served_under_its_name_and_no_other(client, server):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.code == "model_not_found" and "'tiny'" in err.value.message
    unnamed = bad(server, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "tiny"
    assert bad(server, json=chat_body(model="tiny-v2")).json()["error"]["code"] == "model_not_found"


def test_default_served_name_is_meaningful(tmp_path):
    from minimind_v.infer.hosting import served_name

    assert served_name(str(tmp_path / "runs" / "quickstart" / "model")) == "quickstart"
    assert served_name(str(tmp_path / "models" / "minimind2-small-v")) == "minimind2-small-v"
    assert served_name(str(tmp_path / "runs" / "quickstart" / "model"), "mine") == "mine"


def test_too_long_prompt_is_refused_before_a_stream_starts(client, engine):
    import openai

    limit = engine.config.lm.max_position_embeddings
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "red " * limit}],
                                           max_tokens=2, stream=stream)
        assert err.value.code == "invalid_prompt" and "positions" in err.value.message


@pytest.mark.parametrize("part, where, says", [
    ({"type": "input_text", "text": "hi"}, "messages.0.content.0.type", "accepted: 'text', 'image_url'"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "messages.0.content.0.image_url",
     'expected an object {"url"'),
    ({"type": "text"}, "messages.0.content.0.text", "needs a string 'text'"),
])
def test_unsupported_content_parts_are_named(server, part, where, says):
    response = bad(server, json=chat_body(messages=[{"role": "user", "content": [part]}]))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == where and says in error["message"], error


def test_text_before_or_after_the_image_reaches_the_model_in_that_order(client, engine):
    data = png((30, 200, 30))
    image = Image.open(io.BytesIO(data))
    parts = [{"type": "image_url", "image_url": {"url": data_url(data)}}, {"type": "text", "text": "what color"}]
    for ordered, content in ((parts, "<image>\nwhat color"), (parts[::-1], "what color\n<image>")):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ordered}],
                                               max_tokens=12, temperature=0)
        ours = engine.chat([{"role": "user", "content": content}], [image], SamplingParams(max_new_tokens=12))
        assert reply.choices[0].message.content == ours.text


def test_an_images_first_model_answers_the_same_whatever_the_order(images_first_model_dir):
    engine = Engine.load(images_first_model_dir, device="cpu")
    live = LiveServer(create_app(engine, ServeOptions(model=str(images_first_model_dir), **LIMITS)))
    try:
        client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
        data = png((200, 200, 30))
        parts = [{"type": "image_url", "image_url": {"url": data_url(data)}}, {"type": "text", "text": "what color"}]
        name = client.models.list().data[0].id
        replies = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": c}],
                                                  max_tokens=12, temperature=0).choices[0].message.content
                   for c in (parts, parts[::-1])]
    finally:
        live.close()
    ours = engine.chat([{"role": "user", "content": "<image>\nwhat color"}], [Image.open(io.BytesIO(data))],
                       SamplingParams(max_new_tokens=12))
    assert replies == [ours.text, ours.text]


class EndlessEngine:
    """Streams a word every few milliseconds until the generation is stopped; records how each one ended."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.ended = engine, queue.Queue()

    def generate(self, prompts, images, params, on_token=None):
        try:
            while True:
                time.sleep(0.01)
                on_token(0, "word ")
        except BaseException as err:
            self.ended.put(err)
            raise

    def prompt(self, *args, **kwargs):
        return self.engine.prompt(*args, **kwargs)


def test_a_client_that_leaves_mid_stream_stops_the_generation(engine, tiny_model_dir):
    endless = EndlessEngine(engine)
    live = LiveServer(create_app(endless, ServeOptions(model=str(tiny_model_dir)), model_name="tiny"))
    try:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=chat_body(stream=True), timeout=60) as sse:
            assert sse.status_code == 200
            next(line for line in sse.iter_lines() if '"content": "word' in line)
        assert isinstance(endless.ended.get(timeout=30), Cancelled)
        assert httpx.get(f"{live.url}/health").json()["waiting"] == 0
    finally:
        live.close()


@pytest.fixture(scope="module")
def think_server(think_model_dir):
    engine = Engine.load(think_model_dir, device="cpu")
    live = LiveServer(create_app(engine, ServeOptions(model=str(think_model_dir), **LIMITS), model_name="tiny"))
    live.engine = engine
    yield live
    live.close()


def test_chat_template_kwargs_open_the_think_block(think_server):
    question = [{"role": "user", "content": "the red square"}]

    def ask(**extra) -> dict:
        response = bad(think_server, json=chat_body(messages=question, max_tokens=12, temperature=0, **extra))
        assert response.status_code == 200, response.text
        return response.json()

    plain, closed = ask(), ask(chat_template_kwargs={"enable_thinking": False})
    opened = ask(chat_template_kwargs={"open_thinking": True})
    alias = ask(chat_template_kwargs={"enable_thinking": True})  # what Qwen3-style clients send
    engine = think_server.engine
    for reply, thinking in ((plain, False), (closed, False), (opened, True), (alias, True)):
        direct = engine.chat(question, [], SamplingParams(max_new_tokens=12), open_thinking=thinking)
        message = reply["choices"][0]["message"]
        assert reply["usage"]["prompt_tokens"] == direct.prompt_tokens
        if thinking:
            assert (message["reasoning_content"], message["content"]) == split_reasoning(direct.text)
        else:
            assert "reasoning_content" not in message and message["content"] == direct.text
    assert opened["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]


def test_a_streamed_reasoned_answer_has_the_same_fields(think_server):
    body = chat_body(messages=[{"role": "user", "content": "a blue circle"}], max_tokens=16, temperature=0,
                     chat_template_kwargs={"open_thinking": True})
    whole = bad(think_server, json=body).json()["choices"][0]["message"]
    lines = bad(think_server, json={**body, "stream": True}).text.splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == whole["content"]


@pytest.mark.parametrize("text", ["it is red\n\n</think>\n\nred", "a</think>b", "still </thi", "x\n", "</think>",
                                  "half </think", "plain </thinking> not a tag"])
def test_reasoning_deltas_add_up_to_the_split_whatever_the_pieces(text):
    for cut in range(len(text) + 1):
        deltas = AnswerDeltas(thinking=True)
        pieces = [text[:cut], text[cut:cut + 2], text[cut + 2:]]
        out = [d for piece in pieces for d in deltas.feed(piece)] + deltas.feed("", final=True)
        reasoning, reply = split_reasoning(text)
        assert "".join(d.get("reasoning_content", "") for d in out) == reasoning
        assert "".join(d.get("content", "") for d in out) == reply
    assert AnswerDeltas(thinking=False).feed("a</think>b") == [{"content": "a</think>b"}]


@pytest.mark.parametrize("kwargs, param", [
    ({"open_thinking": True, "enable_thinking": False}, "chat_template_kwargs"),
    ({"open_thinking": "yes"}, "chat_template_kwargs.open_thinking"),
    ({"add_vision_id": True}, "chat_template_kwargs.add_vision_id"),
])
def test_bad_chat_template_kwargs_are_named(think_server, kwargs, param):
    response = bad(think_server, json=chat_body(chat_template_kwargs=kwargs))
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and param in error["message"], error


def test_thinking_is_refused_for_a_model_without_a_think_block(server, client):
    import openai

    for key in ("open_thinking", "enable_thinking"):
        response = bad(server, json=chat_body(chat_template_kwargs={key: True}))
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == f"chat_template_kwargs.{key}", error
        assert error["message"].startswith(f"chat_template_kwargs.{key}: ") and "no think block" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}}, stream=True)
    off = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0)
    assert off.choices[0].message.content == plain.choices[0].message.content
