"""`minimind-v serve`: an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health).

One worker thread runs the engine, one request at a time, in arrival order; requests wait in a
bounded queue (full: 429). Every bad request gets a 4xx with an OpenAI-style body
{"error": {"message", "type", "param", "code"}}, and no request can take the server down.

This server has one model, served under one name (`--served-model-name`; GET /v1/models lists it); a
request that names another model in `model` gets OpenAI's 404 `model_not_found` (one that names none
gets this one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import queue
import threading
import time
import urllib.request
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from starlette.exceptions import HTTPException

from minimind_v.constants import IMAGE_MARKER
from minimind_v.errors import UserError
from minimind_v.infer.engine import Completion, Engine, SamplingParams
from minimind_v.infer.hosting import listen_socket, served_name

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServeOptions:
    model: str
    """Model directory."""
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


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The request schema: what OpenAI's chat API sends that this server understands. Unknown fields are ignored.
class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Schema):
    role: str
    content: str | list[dict[str, Any]] | None = None
    """A string, or OpenAI's content parts, checked one by one in `_conversation` so an error names the part."""


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatRequest(_Schema):
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


@dataclass
class _Job:
    prompt: list[int]
    images: list[Image.Image]
    params: SamplingParams
    on_text: Callable[[str], None] | None
    result: Future
    cancelled: threading.Event


class _Cancelled(Exception):
    """Raised inside generation when the client of a streaming request went away."""


class Worker:
    """The one thread that runs the engine; jobs wait in a bounded FIFO queue."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.jobs: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._run, name="minimind-v-generate", daemon=True).start()

    def submit(self, prompt: list[int], images: list[Image.Image], params: SamplingParams,
               on_text: Callable[[str], None] | None = None) -> _Job:
        job = _Job(prompt, images, params, on_text, Future(), threading.Event())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "too many requests are waiting for the model; retry later",
                           code="queue_full", type_="rate_limit_error") from None
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set() or not job.result.set_running_or_notify_cancel():
                continue
            try:
                done = self.engine.generate([job.prompt], [job.images], job.params, self._relay(job))[0]
                job.result.set_result(done)
            except BaseException as err:  # reported to that request; the worker lives on
                job.result.set_exception(err)

    @staticmethod
    def _relay(job: _Job) -> Callable[[int, str], None] | None:
        if job.on_text is None:
            return None

        def relay(_row: int, delta: str) -> None:
            if job.cancelled.is_set():
                raise _Cancelled()
            job.on_text(delta)
        return relay


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
        return JSONResponse(_schema_error(err.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(_internal_error(err).body(), status_code=500)

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
        req = _parse_request(body)
        _check_model(req.model, name)
        params = _sampling_params(req, opts)
        messages, images = _conversation(req, opts)
        prompt = _checked_prompt(engine, messages, len(images))  # refused with a 400, never inside a 200 stream
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _stream(worker, prompt, images, params, completion_id, name, include_usage)
            first = await anext(chunks)  # a refusal (queue full) still gets its status code, not a 200 stream
            return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        job = worker.submit(prompt, images, params)
        done = await _await_job(job)
        return _response(done, completion_id, name)

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


def _parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        raise _schema_error(err.errors()) from None
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="empty_messages")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    return req


def _schema_error(errors: list[dict[str, Any]]) -> APIError:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param,
                    code="invalid_value")


def _check_model(asked: str | None, name: str) -> None:
    if asked is not None and asked != name:  # none given: the one model this server has
        raise APIError(404, f"The model {asked!r} does not exist; this server serves {name!r}", param="model",
                       code="model_not_found")


def _checked_prompt(engine: Engine, messages: list[dict[str, str]], n_images: int) -> list[int]:
    try:
        return engine.prompt(messages, n_images)
    except UserError as err:  # too long for the context, roles out of order
        raise APIError(400, str(err), param="messages", code="invalid_prompt") from None


def _sampling_params(req: ChatRequest, opts: ServeOptions) -> SamplingParams:
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked > opts.max_tokens_limit:
        raise APIError(400, f"{param}={asked} exceeds this server's limit of {opts.max_tokens_limit}",
                       param=param, code="max_tokens_too_large")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
    return SamplingParams(max_new_tokens=asked or opts.max_tokens_limit, temperature=req.temperature,
                          top_p=req.top_p, stop=stop, seed=req.seed)


def _conversation(req: ChatRequest, opts: ServeOptions) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """OpenAI messages -> our {role, content} turns with `<image>` markers, and the images in marker order."""
    messages, images = [], []
    for i, msg in enumerate(req.messages):
        if msg.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {msg.role!r}: expected one of {', '.join(ROLES)}",
                           param=f"messages.{i}.role", code="invalid_role")
        parts = msg.content if isinstance(msg.content, list) else [{"type": "text", "text": msg.content or ""}]
        texts = []
        for j, part in enumerate(parts):
            text, url = _part(part, f"messages.{i}.content.{j}")
            if url is not None:
                images.append(_load_image(url, opts, f"messages.{i}.content.{j}.image_url.url"))
            texts.append(IMAGE_MARKER if url is not None else text)
        messages.append({"role": ROLES[msg.role], "content": "\n".join(texts)})
    return messages, images


def _part(part: dict[str, Any], where: str) -> tuple[str, str | None]:
    """One content part -> (its text, None) or ("", its image URL); a 400 naming the part otherwise."""
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise APIError(400, f"{where}.text: a text part needs a string 'text'", param=f"{where}.text",
                           code="invalid_value")
        if IMAGE_MARKER in text:
            raise APIError(400, f"{where}: the text {IMAGE_MARKER!r} is reserved; send images as image_url parts",
                           param=where, code="invalid_value")
        return text, None
    if kind == "image_url":
        image_url = part.get("image_url")
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise APIError(400, f'{where}.image_url: expected an object {{"url": "data:image/...;base64,..."}}, '
                                f"got {json.dumps(image_url)[:60]}", param=f"{where}.image_url", code="invalid_value")
        return "", image_url["url"]
    raise APIError(400, f"{where}.type: unsupported content part type {kind!r}; accepted: 'text', 'image_url'",
                   param=f"{where}.type", code="invalid_value")


def _load_image(url: str, opts: ServeOptions, param: str) -> Image.Image:
    if url.startswith("data:"):
        data = _decode_data_url(url, opts.max_image_bytes, param)
    elif url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise APIError(400, f"{param}: remote image URLs are disabled on this server (start it with "
                                "--allow-remote-images), send the image as a data: URL", param=param,
                           code="remote_images_disabled")
        data = _fetch(url, opts.max_image_bytes, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise APIError(400, f"{param}: unsupported image URL scheme {scheme!r}; use a data: URL", param=param,
                       code="invalid_image_url")
    return _decode_image(data, opts.max_image_pixels, param)


def _decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{param}: expected data:image/...;base64,<data>", param=param, code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise APIError(400, f"{param}: image exceeds the limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param=param, code="invalid_base64") from None
    if len(data) > max_bytes:
        raise APIError(400, f"{param}: image of {len(data)} bytes exceeds the limit of {max_bytes}", param=param,
                       code="image_too_large")
    return data


def _fetch(url: str, max_bytes: int, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(max_bytes + 1)
    except OSError as err:
        raise APIError(400, f"{param}: cannot fetch the image ({err})", param=param, code="image_fetch_failed") from None
    if len(data) > max_bytes:
        raise APIError(400, f"{param}: image exceeds the limit of {max_bytes} bytes", param=param,
                       code="image_too_large")
    return data


def _decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    from minimind_v.data.formats import BadSample
    from minimind_v.data.images import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return load_image(data, max_pixels=max_pixels)
        except BadSample as err:
            too_large = err.reason == "image_too_large"
            message = f"image too large: {err.detail}" if too_large else "not a decodable image"
            raise APIError(400, f"{param}: {message}", param=param,
                           code="image_too_large" if too_large else "invalid_image") from None


async def _await_job(job: _Job) -> Completion:
    try:
        return await asyncio.wrap_future(job.result)
    except UserError as err:  # the engine's word on the input: too long for the context, roles out of order
        raise APIError(400, str(err), param="messages", code="invalid_prompt") from None
    except asyncio.CancelledError:
        job.cancelled.set()
        raise


async def _stream(worker: Worker, prompt: list[int], images: list[Image.Image],
                  params: SamplingParams, completion_id: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per text delta, a finish chunk, [usage], [DONE]."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str] = asyncio.Queue()
    job = worker.submit(prompt, images, params, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": choices, **({"usage": usage} if usage else {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        result = asyncio.ensure_future(_await_job(job))
        result.add_done_callback(lambda f: f.cancelled() or f.exception())  # a client that left: no log noise
        while not (result.done() and deltas.empty()):
            getter = asyncio.ensure_future(deltas.get())
            await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield chunk({"content": getter.result()})
            else:
                getter.cancel()
        try:
            done = result.result()
        except Exception as err:  # noqa: BLE001 (headers are gone: report in-band, as OpenAI does)
            error = err if isinstance(err, APIError) else _internal_error(err)
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            yield chunk({}, finish=done.finish_reason)
            if include_usage:
                yield chunk({}, usage=_usage(done))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # no-op when finished; stops generation when the client left mid-stream


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def _internal_error(err: Exception) -> APIError:
    return APIError(500, f"internal error: {type(err).__name__}", type_="server_error")


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _response(done: Completion, completion_id: str, name: str) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": _usage(done)}


def main(opts: ServeOptions) -> int:
    import uvicorn

    sock = listen_socket(opts.host, opts.port)  # a taken port is one line, before the model loads
    engine = Engine.load(opts.model)
    app = create_app(engine, opts)
    name = served_name(opts.model, opts.served_model_name)
    print(f"serving {opts.model} as {name!r} at http://{opts.host}:{opts.port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0
