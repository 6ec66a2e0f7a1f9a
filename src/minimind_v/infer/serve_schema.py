"""What serve reads and writes: OpenAI chat-completion requests, checked field by field, and the response bodies.

A request this server cannot answer is an `APIError`: its HTTP status and OpenAI's error body
{"error": {"message", "type", "param", "code"}}, with `param` naming the field at fault.

Thinking (models whose chat template has a think block, minimind-3v): a request opens the block with
`"chat_template_kwargs": {"open_thinking": true}`, the template's own switch, or `enable_thinking`, the name
Qwen3-style clients send vLLM and SGLang. Such an answer comes split as those servers' reasoning parsers
and the original minimind server split it: `reasoning_content` (up to `</think>`), then `content`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.template import THINK_CLOSE
from minimind_v.errors import UserError
from minimind_v.infer.engine import Completion, SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(err: BaseException) -> APIError:
    """A failure that is not the request's: the client learns only its kind."""
    return APIError(500, f"internal error: {type(err).__name__}", type_="server_error")


def invalid_prompt(err: UserError) -> APIError:
    """The engine's word on the conversation: too long for the context, roles out of order."""
    return APIError(400, str(err), param="messages", code="invalid_prompt")


# The request schema: what OpenAI's chat API sends that this server understands. Unknown fields are ignored.
class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Schema):
    role: str
    content: str | list[dict[str, Any]] | None = None
    """A string, or OpenAI's content parts, checked one by one in `conversation` so an error names the part."""


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatRequest(_Schema):
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's defaults, not chat's: clients expect those
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's and SGLang's extension: arguments for the chat template; this one reads its think switch only."""


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a ChatRequest, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        raise schema_error(err.errors()) from None
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="empty_messages")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    return req


def schema_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's (or FastAPI's) validation errors -> a 400 naming the first field at fault."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param,
                    code="invalid_value")


THINKING_KEYS = ("open_thinking", "enable_thinking")
"""The think switch's names in chat_template_kwargs: the minimind template's own, and Qwen3's."""


def thinking_switch(req: ChatRequest) -> tuple[bool, str]:
    """Whether the request opens the think block, and the field that says so (for an error naming it).

    Any other chat_template_kwargs key is refused: the template here reads no other, so ignoring it would
    hide a mistake."""
    kwargs = req.chat_template_kwargs or {}
    for key, value in kwargs.items():
        where = f"chat_template_kwargs.{key}"
        if key not in THINKING_KEYS:
            raise APIError(400, f"{where}: unsupported; this server's chat template reads only "
                                f"{' or '.join(THINKING_KEYS)}", param=where, code="unsupported_value")
        if not isinstance(value, bool):
            raise APIError(400, f"{where}: expected true or false, got {json.dumps(value)[:40]}", param=where,
                           code="invalid_value")
    given = [key for key in THINKING_KEYS if key in kwargs]
    if len({kwargs[key] for key in given}) > 1:
        raise APIError(400, f"chat_template_kwargs: {' and '.join(given)} disagree", param="chat_template_kwargs",
                       code="invalid_value")
    return bool(given) and kwargs[given[0]], f"chat_template_kwargs.{given[0] if given else THINKING_KEYS[0]}"


def split_reasoning(text: str) -> tuple[str, str]:
    """An answer begun inside an open think block -> (reasoning, reply): the text before `</think>` without its
    trailing newlines, and the rest without its leading ones (the template's separator); all reasoning while
    `</think>` has not come."""
    reasoning, closed, reply = text.partition(THINK_CLOSE)
    return (reasoning.rstrip("\n"), reply.lstrip("\n")) if closed else (reasoning, "")


class AnswerDeltas:
    """A streamed answer's text pieces -> chunk deltas that join up to the whole answer's fields.

    Without thinking every piece is content. With it, split_reasoning of the text so far decides, and reasoning
    that `</think>` may still follow (trailing newlines, a partial tag) is held until the next piece shows."""

    def __init__(self, thinking: bool) -> None:
        self.thinking, self.text = thinking, ""
        self.sent = {"reasoning_content": "", "content": ""}

    def feed(self, piece: str, final: bool = False) -> list[dict[str, str]]:
        if not self.thinking:
            return [{"content": piece}] if piece else []
        self.text += piece
        reasoning, reply = split_reasoning(self.text)
        if THINK_CLOSE not in self.text and not final:
            tail = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if reasoning.endswith(THINK_CLOSE[:n])), 0)
            reasoning = reasoning[:len(reasoning) - tail].rstrip("\n")
        deltas = []
        for key, now in (("reasoning_content", reasoning), ("content", reply)):
            if len(now) > len(self.sent[key]):
                deltas.append({key: now[len(self.sent[key]):]})
                self.sent[key] = now
        return deltas


def sampling_params(req: ChatRequest, max_tokens_limit: int) -> SamplingParams:
    """The request's sampling; an answer as long as the limit when it asks for no length."""
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked > max_tokens_limit:
        raise APIError(400, f"{param}={asked} exceeds this server's limit of {max_tokens_limit}",
                       param=param, code="max_tokens_too_large")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
    return SamplingParams(max_new_tokens=asked or max_tokens_limit, temperature=req.temperature,
                          top_p=req.top_p, stop=stop, seed=req.seed)


def conversation(req: ChatRequest, load_image: Callable[[str, str], Image.Image]
                 ) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """OpenAI messages -> our {role, content} turns with image markers, and the images in marker order.

    load_image(url, param) gives the image at an image part's URL, or raises an APIError naming `param`.
    """
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
                images.append(load_image(url, f"messages.{i}.content.{j}.image_url.url"))
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


def usage_body(done: Completion) -> dict[str, int]:
    """The token counts of an answer, as OpenAI reports them."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def completion_body(done: Completion, completion_id: str, name: str, thinking: bool = False) -> dict[str, Any]:
    """The answer to a request without `stream`; one that opened the think block has its reasoning apart."""
    message = {"role": "assistant", "content": done.text}
    if thinking:
        message["reasoning_content"], message["content"] = split_reasoning(done.text)
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": usage_body(done)}


def chunk_body(completion_id: str, created: int, name: str, delta: dict[str, Any], finish: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One chunk of a streamed answer: a delta (with the finish reason on the last), or the usage alone."""
    choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": choices, **({"usage": usage} if usage else {})}
