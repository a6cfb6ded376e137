"""The HTTP side of `softprompt serve` (FastAPI): OpenAI-compatible completions and chat completions for causal_lm
soft prompts, /v1/classify for classifiers (answers as `softprompt predict` gives them), hot loading, health and
Prometheus metrics. Every forward pass runs on the engine's thread; handlers only check, tokenize and wait."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt_cli.data.sources import input_fields
from softprompt_cli.errors import UserError
from softprompt_cli.inference.batches import Item, label_record, make_items
from softprompt_cli.inference.tasks import Task
from softprompt_cli.model.lm import Sampling
from softprompt_cli.serving import schemas
from softprompt_cli.serving.engine import Engine, Limits, Overloaded
from softprompt_cli.serving.metrics import Metrics
from softprompt_cli.serving.registry import OutsideRoot, Registry
from softprompt_cli.serving.requests import Classification, Completion
from softprompt_cli.serving.text import TextStream

log = logging.getLogger("softprompt.serve")
DISCONNECT_POLL_S = 0.25
"""How often a handler waiting for the engine checks that its client is still there."""
RETRY_AFTER_S = 1


@dataclass
class Settings:
    api_key: str | None = None
    admin_root: Path | None = None
    """Hot loading reads checkpoints under this folder only; None: the admin endpoints are off."""
    limits: Limits = field(default_factory=Limits)
    max_input_tokens: int = 2048
    max_tokens_limit: int = 512
    max_inputs: int = 128
    """Inputs in one /v1/classify request."""
    chat_template: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.headers, self.kind = status, message, param, headers, kind


class ClientGone(Exception):
    """The client disconnected while its request waited."""


@dataclass
class Server:
    registry: Registry
    engine: Engine
    metrics: Metrics
    settings: Settings
    started: int = field(default_factory=lambda: int(time.time()))
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def create_app(registry: Registry, settings: Settings) -> FastAPI:
    metrics = Metrics()
    engine = Engine(lambda completion: completion.task.model if completion.task else registry.runner,
                    registry.tokenizer, settings.limits, metrics, registry.device)
    server = Server(registry, engine, metrics, settings)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="softprompt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    for path, endpoint, methods in ROUTES:
        app.add_api_route(path, endpoint, methods=methods)
    return app


# ---------------------------------------------------------------------------------------------- guard and errors


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(schemas.error_body(message, kind, param), status_code=status, headers=headers)


class Guard:
    """Every request: the API key (when one is set), a bound on the body size, and its metrics. A plain ASGI
    middleware: FastAPI's @app.middleware("http") runs each request through another task and memory streams,
    which cost more of the event loop per request than the rest of a classification."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        reply = _StatusOf(send)
        refusal = self._refusal(scope["method"], Headers(scope=scope))
        try:
            await (refusal or self.app)(scope, receive, reply.send)
        finally:
            route = scope.get("route")
            self.server.metrics.observe_request(getattr(route, "path", "unmatched"), reply.status,
                                                time.monotonic() - start)

    def _refusal(self, method: str, headers: Headers) -> JSONResponse | None:
        key, limit = self.server.settings.api_key, self.server.settings.max_body_bytes
        # A body without Content-Length (chunked) could not be bounded before it is read: refused (411).
        length = headers.get("content-length", "0" if method in ("GET", "HEAD") else "")
        # as bytes: compare_digest refuses non-ASCII str, and a header is bytes (Starlette reads it as latin-1)
        given = headers.get("authorization", "").encode("latin-1")
        if key and not secrets.compare_digest(given, f"Bearer {key}".encode()):
            return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                          "the server was started with (--api-key or SOFTPROMPT_API_KEY).",
                          headers={"WWW-Authenticate": "Bearer"}, kind="authentication_error")
        if not (length.isascii() and length.isdigit()):
            return _error(411, "send the request body with a Content-Length header (not chunked).")
        if int(length) > limit:
            return _error(413, f"the request body is over {limit} bytes. Send fewer or shorter inputs per request.")
        return None


class _StatusOf:
    """Passes a response on, noting its status code (500 until one is sent: the request failed)."""

    def __init__(self, send):
        self._send, self.status = send, 500

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _error(error.status, error.message, error.param, error.headers, error.kind)


async def _client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: the client closed the connection


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        if problem.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})")
        elif not where and problem.get("type") in ("model_attributes_type", "dict_type"):
            problems.append("the body must be a JSON object (send it with 'Content-Type: application/json')")
        elif problem.get("type") == "extra_forbidden":
            problems.append(f"{where}: not a field this server knows (remove it)")
        else:
            problems.append(f"{where or 'body'}: {problem.get('msg')}")
    return _error(400, "invalid request: " + "; ".join(problems[:5]), param=None)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/completions, "
                    "/v1/chat/completions, /v1/classify", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(error.status_code, message.get(error.status_code, str(error.detail)))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error(500, f"the server failed on this request ({type(error).__name__}: {error})", kind="server_error")


# ---------------------------------------------------------------------------------------------- looking things up


def _server(request: Request) -> Server:
    return request.app.state.server


def _task(server: Server, name: str) -> Task | None:
    """The task a request's `model` names (None: the base model); 404 listing the known names."""
    if name == server.registry.base_name:
        return None
    task = server.registry.get(name)
    if task is None:
        known = [server.registry.base_name, *server.registry.names()]
        raise ApiError(404, f"model {name!r} is not served here; the models are: {', '.join(known)} (GET /v1/models)",
                       "model", kind="not_found_error")
    return task


def _submit(server: Server, work) -> None:
    try:
        server.engine.submit(work)
    except Overloaded:
        raise ApiError(503, f"the server is busy: {server.settings.limits.max_queue} requests are already waiting. "
                       f"Retry after {RETRY_AFTER_S} s.", headers={"Retry-After": str(RETRY_AFTER_S)},
                       kind="overloaded_error") from None


@dataclass
class _Watch:
    """A request waiting for the engine, with an eye on its client: checked every DISCONNECT_POLL_S whether results
    arrive or not; once the client is gone, the work is cancelled (the engine drops it) and ClientGone raised."""

    request: Request
    work: Classification | Completion
    next_check: float = field(default_factory=lambda: time.monotonic() + DISCONNECT_POLL_S)

    async def result(self, awaitable: asyncio.Future) -> object:
        while True:
            done, _ = await asyncio.wait({awaitable}, timeout=max(0.0, self.next_check - time.monotonic()))
            if time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await self.request.is_disconnected():
                    self.work.cancelled = True
                    awaitable.cancel()
                    raise ClientGone()
            if done:
                if awaitable.exception() is not None:
                    raise _engine_failure(awaitable.exception())
                return awaitable.result()


def _engine_failure(error: BaseException) -> ApiError:
    """The engine failed this request (out of memory, a bug): a 500 that says so, handled like any ApiError (an
    unhandled exception would also close the client's keep-alive connection)."""
    log.error("request failed in the engine", exc_info=error)
    return ApiError(500, f"the server failed on this request ({type(error).__name__}: {error})", kind="server_error")


# ---------------------------------------------------------------------------------------------- endpoints


async def health(request: Request) -> Response:
    server = _server(request)
    state = {"status": "ok", "model": server.registry.base_name, "soft_prompts": len(server.registry.names()),
             "waiting": server.engine.waiting, "running": server.engine.running_rows}
    if not server.engine.alive:  # nothing would answer: a load balancer should stop sending here
        return JSONResponse({**state, "status": "engine stopped"}, status_code=503)
    return JSONResponse(state)


async def metrics(request: Request) -> Response:
    server = _server(request)
    server.metrics.prompts.set(len(server.registry.names()))
    return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(server: Server, name: str, task: Task | None) -> dict:
    card = {"id": name, "object": "model", "created": server.started, "owned_by": "softprompt",
            "root": server.registry.base_name, "parent": None if task is None else server.registry.base_name}
    if task is not None:
        card["softprompt"] = {"method": task.recipe.method.name, "task_type": task.recipe.task.type,
                              "num_virtual_tokens": task.model.num_virtual_tokens,
                              "labels": None if task.generates else task.label_names}
    return card


async def models(request: Request) -> dict:
    server = _server(request)
    cards = [_model_card(server, server.registry.base_name, None)]
    cards += [_model_card(server, name, task) for name, task in dict(server.registry.tasks).items()]
    return {"object": "list", "data": cards}


async def classify(request: Request, body: schemas.ClassifyRequest) -> dict:
    server = _server(request)
    task = _task(server, body.model)
    if task is None or task.generates:
        raise ApiError(400, f"model {body.model!r} generates text and has no labels: use /v1/completions. "
                       "/v1/classify takes classifiers and causal_lm soft prompts with label words.", "model")
    if len(body.input) > server.settings.max_inputs:
        raise ApiError(400, f"input has {len(body.input)} texts; this server takes at most "
                       f"{server.settings.max_inputs} per request (--max-inputs). Split the request.", "input")
    items = [_classify_item(server, task, text, index) for index, text in enumerate(body.input)]
    work = Classification(asyncio.get_running_loop(), items=items, future=asyncio.get_running_loop().create_future())
    _submit(server, work)
    results = await _Watch(request, work).result(work.future)
    data = [{"index": i, **label_record(task.label_names, p)} for i, p in enumerate(results)]
    return {"object": "list", "model": body.model, "data": data}


def _classify_item(server: Server, task: Task, given: str | list[str], index: int):
    """One input of /v1/classify tokenized for its task, as predict tokenizes it (long texts truncated to the
    recipe's max_length); too long before truncation (max_input_tokens), or of the wrong shape: 400."""
    texts = [given] if isinstance(given, str) else list(given)
    expected = len(input_fields(task.recipe.data, task.recipe.task))
    if not 1 <= len(texts) <= 2 or (task.knows_its_texts and len(texts) != expected):
        shape = "a text" if expected == 1 else "a pair [text, text_pair]"
        raise ApiError(400, f"input[{index}] has {len(texts)} texts; model {task.name!r} reads {shape} per input.",
                       "input")
    fields = ["text", "text_pair"][:len(texts)]
    try:
        [item] = make_items([dict(zip(fields, texts))], {task.name: task}, server.registry.tokenizer, None, fields,
                            origin=f"input[{index}]", only_task=task.name)
    except UserError as error:
        raise ApiError(400, str(error), "input") from None
    tokens = _input_tokens(server.registry.tokenizer, item, texts)
    if tokens > server.settings.max_input_tokens:
        raise ApiError(400, f"input[{index}] has {tokens} tokens; this server takes at most "
                       f"{server.settings.max_input_tokens} per input (--max-input-tokens).", "input")
    return item


def _input_tokens(tokenizer, item: Item, texts: list[str]) -> int:
    """The texts' tokens without special tokens, before truncation (what --max-input-tokens counts). A classifier's
    encoding shorter than max_length was not truncated, so it is counted as it is, less its special tokens; others
    (and causal_lm inputs, inside their template) are tokenized again without truncation. Not through the fast
    tokenizer's backend: it keeps whatever truncation the last call (or tokenizer.json) set."""
    sequences = [sequence["input_ids"] for sequence in item.sequences]
    if not item.task.model.causal_lm and all(len(ids) < item.task.recipe.data.max_length for ids in sequences):
        specials = tokenizer.num_special_tokens_to_add(pair=len(texts) > len(sequences))
        return sum(len(ids) for ids in sequences) - specials * len(sequences)
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"])


def _sampling(body: schemas.CompletionRequest | schemas.ChatRequest) -> Sampling | None:
    if body.temperature == 0:
        return None
    generator = torch.Generator()
    if body.seed is None:
        generator.seed()
    else:
        generator.manual_seed(body.seed)
    return Sampling(body.temperature, 0, body.top_p, generator)


COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions (chat has none: up to the context)."""


def _completion(request: Request, server: Server, body, input_ids: list[int], default_max_tokens: int | None
                ) -> Completion:
    """A generation request checked against the server's limits and the model's positions. A request without
    max_tokens gets `default_max_tokens` (None: all the room there is), within both."""
    task = _task(server, body.model)
    if task is not None and not task.model.causal_lm:
        raise ApiError(400, f"model {body.model!r} is a classifier: use /v1/classify.", "model")
    limits = server.settings
    virtual = task.model.num_virtual_tokens if task is not None else 0
    positions = server.registry.max_positions
    max_tokens = body.token_limit
    if max_tokens is None:
        room = positions - virtual - len(input_ids) if positions else limits.max_tokens_limit
        max_tokens = max(1, min(default_max_tokens or limits.max_tokens_limit, limits.max_tokens_limit, room))
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server generates at most {limits.max_tokens_limit} "
                       "tokens per request (--max-tokens-limit).", "max_tokens")
    if len(input_ids) > limits.max_input_tokens:
        raise ApiError(400, f"the prompt has {len(input_ids)} tokens; this server takes at most "
                       f"{limits.max_input_tokens} (--max-input-tokens).", "prompt")
    if len(body.stop_strings) > schemas.MAX_STOP_STRINGS:
        raise ApiError(400, f"stop has {len(body.stop_strings)} strings; give at most {schemas.MAX_STOP_STRINGS}.",
                       "stop")
    if positions and virtual + len(input_ids) + max_tokens > positions:
        raise ApiError(400, f"the prompt ({len(input_ids)} tokens) + the soft prompt ({virtual}) + max_tokens "
                       f"({max_tokens}) exceed the model's {positions} positions. Shorten the prompt or lower "
                       "max_tokens.", "max_tokens")
    if not input_ids:
        raise ApiError(400, "the prompt is empty: give some text to continue.", "prompt")
    tokenizer = server.registry.tokenizer
    stream = TextStream(tokenizer, server.registry.stop_ids, body.stop_strings, max_tokens, input_ids)
    return Completion(asyncio.get_running_loop(), task=task, input_ids=input_ids, stream=stream,
                      sampling=_sampling(body), events=asyncio.Queue(), model_name=body.model)


async def _answer(request: Request, server: Server, work: Completion, chat: bool) -> dict:
    """The whole generation as one response."""
    _submit(server, work)
    parts, watch = [], _Watch(request, work)
    while True:
        event = await watch.result(asyncio.ensure_future(work.events.get()))
        if event[0] == "error":
            raise _engine_failure(event[1])
        if event[0] == "text":
            parts.append(event[1])
            continue
        body = schemas.completion_body(chat, schemas.new_id("chatcmpl" if chat else "cmpl"), work.model_name,
                                       "".join(parts), event[1])
        body["usage"] = schemas.usage(len(work.input_ids), len(work.stream.tokens))
        return body


async def _events(work: Completion, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a streamed generation, then [DONE]."""
    ident = schemas.new_id("chatcmpl" if chat else "cmpl")
    if chat:
        yield _sse(schemas.completion_body(True, ident, work.model_name, "", None, first=True, final=False))
    while True:
        event = await work.events.get()
        if event[0] == "error":
            yield _sse(schemas.error_body(f"generation failed: {event[1]}", "server_error"))
            break
        done = event[0] == "done"
        text, reason = (None, event[1]) if done else (event[1], None)
        yield _sse(schemas.completion_body(chat, ident, work.model_name, text, reason, final=False))
        if done:
            if include_usage:
                chunk = schemas.completion_body(chat, ident, work.model_name, None, None, final=False)
                chunk.update(choices=[], usage=schemas.usage(len(work.input_ids), len(work.stream.tokens)))
                yield _sse(chunk)
            break
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A streamed generation's response: however it ends (finished, the client gone, even before the first event
    was read), its row is cancelled, so the engine drops it."""

    def __init__(self, work: Completion, chat: bool, include_usage: bool):
        super().__init__(_events(work, chat, include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.work = work

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.work.cancelled = True


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _respond(request: Request, server: Server, work: Completion, body, chat: bool):
    if not body.stream:
        return await _answer(request, server, work, chat)
    _submit(server, work)
    return _EventStream(work, chat, bool(body.stream_options and body.stream_options.include_usage))


async def completions(request: Request, body: schemas.CompletionRequest) -> object:
    server = _server(request)
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise ApiError(400, f"prompt is a list of {len(body.prompt)} texts; this server takes one prompt per "
                       "request (send several requests: they are batched together).", "prompt")
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    work = _completion(request, server, body, server.registry.tokenizer(text)["input_ids"],
                       COMPLETIONS_DEFAULT_MAX_TOKENS)
    return await _respond(request, server, work, body, chat=False)


async def chat_completions(request: Request, body: schemas.ChatRequest) -> object:
    server = _server(request)
    tokenizer = server.registry.tokenizer
    template = server.settings.chat_template or tokenizer.chat_template
    if not template:
        raise ApiError(400, f"the model {server.registry.base_name!r} has no chat template, so chat messages "
                       "cannot be turned into text. Use /v1/completions, or start the server with "
                       "--chat-template FILE.", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as error:  # a template's own raise_exception(), or a broken template
        raise ApiError(400, f"the chat template refused these messages: {error}", "messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    work = _completion(request, server, body, ids, None)
    return await _respond(request, server, work, body, chat=True)


# ---------------------------------------------------------------------------------------------- admin


def _admin_path(server: Server, given: str) -> Path:
    """A path to load from, which must lie under the admin root (no `..`, no symlink out of it)."""
    root = server.settings.admin_root
    if root is None:
        raise ApiError(403, "loading and unloading are off: start the server with --admin-root DIR to load "
                       "checkpoints from under DIR.", kind="permission_error")
    try:
        resolved = (root / given).resolve()
    except (ValueError, OSError) as error:  # a NUL byte, a link loop
        raise ApiError(400, f"path {given!r} is not a usable path ({error}).", "path") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ApiError(403, f"path {given!r} is outside the admin root {str(root)!r}; only checkpoints under it can "
                       "be loaded.", "path", kind="permission_error")
    return resolved


async def load(request: Request, body: schemas.LoadRequest) -> dict:
    server = _server(request)
    folder = _admin_path(server, body.path)
    if body.name is not None and server.registry.get(body.name) is not None:
        raise ApiError(409, f"a soft prompt named {body.name!r} is already served; unload it first or choose "
                       "another name.", "name")
    async with server.load_lock:  # one load at a time: names are checked and taken together
        try:
            names = await asyncio.to_thread(server.registry.load, folder, body.name, server.settings.admin_root)
        except UserError as error:
            raise ApiError(409 if "already served" in str(error) else 400, str(error), "path") from None
        except OutsideRoot as error:
            raise ApiError(403, str(error), "path", kind="permission_error") from None
    return {"loaded": names}


async def unload(request: Request, body: schemas.UnloadRequest) -> dict:
    server = _server(request)
    _admin_path(server, ".")
    try:
        server.registry.unload(body.name)
    except KeyError:
        raise ApiError(404, f"no soft prompt {body.name!r} is loaded; loaded: {', '.join(server.registry.names())}.",
                       "name", kind="not_found_error") from None
    return {"unloaded": body.name}


ROUTES = [
    ("/health", health, ["GET"]),
    ("/metrics", metrics, ["GET"]),
    ("/v1/models", models, ["GET"]),
    ("/v1/completions", completions, ["POST"]),
    ("/v1/chat/completions", chat_completions, ["POST"]),
    ("/v1/classify", classify, ["POST"]),
    ("/admin/load", load, ["POST"]),
    ("/admin/unload", unload, ["POST"]),
]
