"""`minimind-v serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health).

One worker thread runs the engine, one request at a time, in arrival order; requests wait in a
bounded queue (full: 429). Every bad request gets a 4xx with an OpenAI-style body
{"error": {"message", "type", "param", "code"}}, and no request can take the server down.

This server has one model, served under one name (`--served-model-name`; GET /v1/models lists it); a
request that names another model in `model` gets OpenAI's 404 `model_not_found` (one that names none
gets this one). serve_schema.py reads the requests and writes the bodies, serve_images.py loads images.
A model with a think block (minimind-3v) reasons first when a request sends
`"chat_template_kwargs": {"open_thinking": true}`; the answer then has `reasoning_content` apart.
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException

from minimind_v.errors import UserError
from minimind_v.infer.engine import Completion, Engine, SamplingParams
from minimind_v.infer.hosting import listen_socket, served_name
from minimind_v.infer.serve_images import load_image_url
from minimind_v.infer.serve_schema import (AnswerDeltas, APIError, ChatRequest, chunk_body, completion_body,
                                           conversation, internal_error, invalid_prompt, parse_request,
                                           sampling_params, schema_error, thinking_switch, usage_body)
from minimind_v.infer.streaming import Generation, TextCallback


@dataclass
class ServeOptions:
    model: str
    """Model directory."""
    adapter: str | None = None
    """LoRA adapter directory (peft format, e.g. a LoRA run's OUT/model/adapter) applied to the model; default: the
    model directory's own adapter/, when it has one."""
    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the API on this machine (0.0.0.0 exposes it to the network)."""
    port: int = 8000
    """TCP port."""
    max_request_bytes: int = 20_000_000
    """Largest request body accepted (413 above)."""
    max_image_bytes: int = 10_000_000
    """Largest encoded image accepted."""
    max_image_pixels: int = 40_000_000
    """Largest image accepted, in width x height pixels (checked before decoding)."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for; also the answer length when a request gives none."""
    max_queue: int = 16
    """Requests allowed to wait for the model; more get 429."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs (off: only data: URLs). file: URLs are always refused."""
    served_model_name: str | None = None
    """The model's name in the API (a request naming another gets 404); default: the model directory's name,
    or its parent's when the directory is called model (runs/quickstart/model -> quickstart)."""


class Worker:
    """The one thread that runs the engine; generations wait in a bounded FIFO queue."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Generation[Completion]] = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._run, name="minimind-v-generate", daemon=True).start()

    def submit(self, prompt: list[int], images: list[Image.Image], params: SamplingParams,
               stream: bool = False) -> Generation[Completion]:
        """Queue one answer; with `stream`, its text pieces are read on the running event loop."""
        def generate(on_text: TextCallback | None) -> Completion:
            on_token = (lambda _row, piece: on_text(piece)) if on_text is not None else None
            return self.engine.generate([prompt], [images], params, on_token)[0]

        job = Generation(generate, read_by="event_loop" if stream else None)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "too many requests are waiting for the model; retry later",
                           code="queue_full", type_="rate_limit_error") from None
        return job

    def _run(self) -> None:
        while True:
            self.jobs.get().run()  # an error goes to that request's result; the worker lives on


def create_app(engine: Engine, opts: ServeOptions, model_name: str | None = None) -> FastAPI:
    """The FastAPI application around a loaded engine."""
    name = model_name or served_name(opts.model, opts.served_model_name)
    created = int(time.time())
    worker = Worker(engine, opts.max_queue)
    app = FastAPI(title="minimind-v", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(schema_error(err.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(internal_error(err).body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "waiting": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "minimind-v"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _read_body(request, opts.max_request_bytes)
        req = parse_request(body)
        _check_model(req.model, name)
        params = sampling_params(req, opts.max_tokens_limit)
        thinking = _checked_thinking(engine, req)
        messages, images = conversation(req, functools.partial(load_image_url, opts))
        prompt = _checked_prompt(engine, messages, len(images), thinking)  # a 400, never inside a 200 stream
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _stream(worker, prompt, images, params, _Reply(completion_id, name, thinking), include_usage)
            first = await anext(chunks)  # a refusal (queue full) still gets its status code, not a 200 stream
            return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        job = worker.submit(prompt, images, params)
        done = await _await_job(job)
        return completion_body(done, completion_id, name, thinking)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def _check_model(asked: str | None, name: str) -> None:
    if asked is not None and asked != name:  # none given: the one model this server has
        raise APIError(404, f"The model {asked!r} does not exist; this server serves {name!r}", param="model",
                       code="model_not_found")


def _checked_thinking(engine: Engine, req: ChatRequest) -> bool:
    """The request's think switch, refused with a 400 naming its field when the model has no think block
    (turning it off is always fine: that is what such a model does)."""
    thinking, param = thinking_switch(req)
    if thinking:
        try:
            engine.check_open_thinking(thinking, param)
        except UserError as err:
            raise APIError(400, str(err), param=param, code="unsupported_value") from None
    return thinking


def _checked_prompt(engine: Engine, messages: list[dict[str, str]], n_images: int, thinking: bool) -> list[int]:
    try:
        return engine.prompt(messages, n_images, open_thinking=thinking)
    except UserError as err:
        raise invalid_prompt(err) from None


async def _await_job(job: Generation[Completion]) -> Completion:
    with job:  # a cancelled request: its job, if still waiting, never starts
        try:
            return await asyncio.wrap_future(job.result)
        except UserError as err:
            raise invalid_prompt(err) from None


@dataclass
class _Reply:
    """What a streamed answer's chunks carry besides its text."""

    completion_id: str
    name: str
    thinking: bool


async def _stream(worker: Worker, prompt: list[int], images: list[Image.Image],
                  params: SamplingParams, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per text piece (reasoning apart), a finish chunk, [usage],
    [DONE]."""
    job = worker.submit(prompt, images, params, stream=True)
    created = int(time.time())
    deltas = AnswerDeltas(reply.thinking)

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        body = chunk_body(reply.completion_id, created, reply.name, delta, finish, usage)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    with job:  # a client that left mid-stream: stop the generation
        yield chunk({"role": "assistant", "content": ""})
        async for piece in job:
            for delta in deltas.feed(piece):
                yield chunk(delta)
        for delta in deltas.feed("", final=True):  # reasoning held back in case `</think>` came next
            yield chunk(delta)
        try:
            done = job.result.result()
        except Exception as err:  # noqa: BLE001 (headers are gone: report in-band, as OpenAI does)
            error = invalid_prompt(err) if isinstance(err, UserError) else internal_error(err)
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            yield chunk({}, finish=done.finish_reason)
            if include_usage:
                yield chunk({}, usage=usage_body(done))
        yield "data: [DONE]\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def main(opts: ServeOptions) -> int:
    import uvicorn

    sock = listen_socket(opts.host, opts.port)  # a taken port is one line, before the model loads
    engine = Engine.load(opts.model, adapter=opts.adapter)
    app = create_app(engine, opts)
    name = served_name(opts.model, opts.served_model_name)
    print(f"serving {opts.model} as {name!r} at http://{opts.host}:{opts.port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0
