"""`gearshift serve`: the OpenAI-compatible HTTP face of the engine (FastAPI + uvicorn).

Endpoints: `/v1/chat/completions`, `/v1/completions` (streamed as server-sent events exactly as
OpenAI sends them), `/v1/models`, `/tokenize`, `/detokenize`, `/health` (503 until the model is
loaded), `/metrics` (Prometheus) and the chat page at `/`. The model loads in a thread after the
server starts listening, so `/health` answers from the first moment.

The routes read a body into a `Job` and run it on a `Backend` (`backend.py`): the engine in this
process (`create_app`), or engine replicas behind Ray Serve (`cluster.py`, which builds the same
app with `create_backend_app`), so both speak exactly the same API.

No request may hurt another. Each one is authenticated before its body is read; the body is read
up to `max_body_bytes` (413 beyond), then parsed, validated and tokenized in worker threads, never
on the event loop (the tokenizer releases the GIL), and a prompt longer in characters than the
context window could hold in tokens is refused before it is tokenized. Every refusal is a 4xx in
OpenAI's envelope, and anything unforeseen a 500 in it, never a traceback. Connections that stall
(headers or body) are closed by the protocol in `http.py`. A model that fails to load stops the
server (`on_failure`), so `gearshift serve` exits non-zero instead of answering 503 forever.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import ServerLimits
from ..errors import GearshiftError
from ..kv_policy import POLICIES, KVPolicy
from ..llm import LLM
from ..sequence import Completion
from .backend import Backend, Job, LocalBackend, Run
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Strategy,
    TokenizeRequest,
    chat_logprobs,
    check_supported,
    completion_logprobs,
    engine_report,
    envelope,
    messages_as_dicts,
    new_id,
    parse_speculative_config,
    sse,
    usage,
)

log = logging.getLogger("gearshift.server")


@dataclass
class ServerConfig(ServerLimits):
    """The server's settings: its limits (`config.ServerLimits`, shared with the CLI's defaults),
    the name clients send, the API key, and the strategies it runs and offers."""

    model_name: str = "gearshift"
    api_key: str | None = None
    speculative: Strategy = field(default_factory=Strategy)  # the server-wide default; a request may choose its own
    offered: list[Strategy] = field(default_factory=list)  # more a request may choose (besides the training-free)


class State:
    """What the routes share: the backend once started (None while loading), or why starting failed."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics(config.model_name)
        self.backend: Backend | None = None
        self.error: str | None = None
        self.on_failure: Callable[[], None] | None = None  # `serve` sets it: stop the server

    def ready(self) -> Backend:
        if self.backend is None:
            raise APIError(
                503,
                f"the model is not available: {self.error}" if self.error else "the model is loading",
                type="service_unavailable",
                headers={"Retry-After": "1"},
            )
        return self.backend


def create_app(load: Callable[[], LLM], config: ServerConfig | None = None) -> FastAPI:
    """The app on one engine in this process; `load` builds the LLM (called in a thread once the server is up)."""
    config = config or ServerConfig()
    return create_backend_app(
        lambda metrics: LocalBackend(load(), metrics, config.max_queue, config.speculative, config.offered), config
    )


def create_backend_app(start: Callable[[Metrics], Backend], config: ServerConfig) -> FastAPI:
    """The app on any backend; `start` builds it (in a thread once the server is up), given the
    metrics it reports to."""
    state = State(config)

    def loader() -> None:
        try:
            state.backend = start(state.metrics)
            log.info("model ready")
        except Exception as e:
            state.error = str(e) or type(e).__name__
            log.error("loading failed: %s", state.error)
            if state.on_failure is not None:
                state.on_failure()

    async def lifespan(app: FastAPI):
        threading.Thread(target=loader, name="gearshift-load", daemon=True).start()
        yield
        if state.backend is not None:
            state.backend.stop()

    app = FastAPI(title="gearshift", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gearshift = state

    # -------------------------------------------------------------- errors in OpenAI's envelope

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError):
        error = invalid_body(e.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(GearshiftError)
    async def bad_input(request: HTTPRequest, e: GearshiftError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: HTTPRequest, e: Exception):  # logged with its traceback; the client gets one line
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    async def read(request: HTTPRequest, model: type[BaseModel]):
        """Authenticate, then read the body (at most max_body_bytes), then parse and validate it in a
        worker thread: an unauthenticated client learns nothing about the body, a large one does not
        hold the event loop."""
        authorize(request)
        raw = await read_body(request, config.max_body_bytes)
        if not raw.strip():
            raise APIError(400, "the request needs a JSON body")
        return await asyncio.to_thread(parse_body, model, raw)

    def authorize(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not token:
            raise APIError(
                401,
                "missing API key: send it as `Authorization: Bearer KEY`",
                type="authentication_error",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(
                404,
                f"the model `{name}` does not exist; this server serves `{config.model_name}`",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    # -------------------------------------------------------------- plain endpoints

    @app.get("/health")
    async def health():
        if state.backend is None:
            return JSONResponse(
                {"status": "error", "error": state.error} if state.error else {"status": "loading"}, status_code=503
            )
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("gearshift.server").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        backend = state.ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "gearshift",
                    "max_model_len": backend.window,
                }
            ],
        }

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await read(request, TokenizeRequest)
        check_model(body.model)
        backend = state.ready()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        tok = backend.tokenizer
        if body.messages is not None:
            messages = messages_as_dicts(body.messages)
            ids = await asyncio.to_thread(tok.encode_chat, messages, body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": backend.window, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await read(request, DetokenizeRequest)
        check_model(body.model)
        backend = state.ready()
        vocab = backend.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(backend.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    # -------------------------------------------------------------- completions

    async def accept(request: HTTPRequest, model: type[BaseModel]):
        """The checks every completion request passes before its prompt is read."""
        body = await read(request, model)
        check_model(body.model)
        check_supported(body)
        return body, state.ready()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body, backend = await accept(request, ChatRequest)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = messages_as_dicts(body.messages)
        check_chars(backend, sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = await asyncio.to_thread(backend.tokenizer.encode_chat, messages, body.add_generation_prompt)
        except GearshiftError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _run(state, request, body, [ids], max_tokens, logprobs, chat=True)

    @app.post("/v1/completions")
    async def complete(request: HTTPRequest):
        body, backend = await accept(request, CompletionRequest)
        p = body.prompt
        many = bool(p) and not isinstance(p, str) and not isinstance(p[0], int)  # a list of prompts
        prompts = p if many else [p]
        for x in prompts:
            check_chars(backend, len(x) if isinstance(x, str) else 0, "prompt")
        try:  # text is tokenized, ids are range-checked, as LLM.generate does
            ids = await asyncio.to_thread(lambda: [backend.encode(x) for x in prompts])
        except GearshiftError as e:
            raise APIError(400, str(e), param="prompt") from None
        return await _run(state, request, body, ids, body.max_tokens, body.logprobs, chat=False)

    return app


# ------------------------------------------------------------------ reading a request


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` bytes (its
    Content-Length, or what has arrived)."""
    too_large = APIError(
        413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client went away before its body arrived") from None
    return b"".join(chunks)


def parse_body(model: type[BaseModel], raw: bytes):
    """The body as `model` (strict JSON: a lone surrogate or invalid UTF-8 is a 400 too), or the
    APIError saying what is wrong with it (formatting it can cost as much as parsing: one thread)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_body(e.errors()) from None


def invalid_body(errors: list) -> APIError:
    """A pydantic validation failure as OpenAI's 400: the first problem, and where."""
    # a value that fits none of a union's members fails each; the member whose type it had (a list
    # too long, rather than "not a string") says what is wrong with it
    first = (
        next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
        if errors
        else {"msg": "invalid request", "loc": ()}
    )
    # fields and list indexes; not the union members pydantic names on the way ("list[constrained-str]")
    loc = [
        str(x)
        for x in first.get("loc", ())
        if x != "body"
        and (
            isinstance(x, int)
            or (str(x).isidentifier() and x not in ("str", "int", "float", "bool", "list", "dict", "none"))
        )
    ]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request needs a JSON body")
    param = loc[0] if loc else None  # the body's field (deeper places, and union members, are in the message)
    message = f"{'.'.join(loc) or 'body'}: {first['msg']}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return APIError(400, message, param=param)


def check_chars(backend: Backend, chars: int, param: str) -> None:
    """Refuse, before tokenizing, text longer than the context window could hold: no token covers
    more characters than the longest piece in the vocabulary (doubled: a normalizer may compose)."""
    limit = 2 * backend.window * backend.tokenizer.longest_piece
    if chars > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {backend.window} tokens, and the {param} "
            f"({chars} characters) cannot fit in it",
            param=param,
            code="context_length_exceeded",
        )


# ------------------------------------------------------------------ one request, start to end


def _job(state: State, body, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None) -> Job:
    """The body's settings, checked as far as the tokenizer and the window allow (the engine side
    checks the rest: drafters, sampling values)."""
    window = state.ready().window
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    for ids in prompts:
        asked = max_tokens if max_tokens is not None else 0
        if len(ids) + asked > window or len(ids) >= window:
            raise APIError(
                400,
                f"this model's maximum context length is {window} tokens, but {len(ids) + asked} were "
                f"requested ({len(ids)} in the {param}, {asked} in the completion); reduce the length of "
                f"the {param} or max_tokens",
                param=param,
                code="context_length_exceeded",
            )
    strategy = state.config.speculative
    if body.speculative_config is not None:
        try:
            strategy = parse_speculative_config(body.speculative_config)
        except GearshiftError as e:
            raise APIError(400, str(e), param="speculative_config") from None
    try:
        kv = KVPolicy.of(body.kv_policy, body.kv_budget)
    except GearshiftError as e:
        raise APIError(400, str(e), param="kv_budget" if body.kv_policy in POLICIES else "kv_policy") from None
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    params = dict(
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=top_k,
        stop=stop,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        seed=body.seed,
    )
    return Job(prompts, params, max_tokens, body.n, strategy, kv, stream=body.stream)


async def _run(
    state: State,
    http: HTTPRequest,
    body,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    chat: bool,
):
    backend = state.ready()
    run = await backend.start(_job(state, body, prompts, max_tokens, logprobs))
    kind = "chat.completion" if chat else "text_completion"
    rid = new_id("chatcmpl" if chat else "cmpl")
    model = state.config.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(
            run,
            len(prompts) * body.n,
            body.n,
            kind + ".chunk" if chat else kind,
            rid,
            model,
            include_usage,
            chat,
            logprobs is not None,
        )
        return StreamingResponse(
            gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    completions = await _collect(run, len(prompts) * body.n, http)
    if completions is None:
        return Response(status_code=499)  # the client is gone: nobody reads this
    choices = []
    for i, c in enumerate(completions):
        if chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
            )
        else:
            choices.append(
                {
                    "index": i,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c.logprobs) if logprobs is not None else None,
                }
            )
    groups = [completions[i : i + body.n] for i in range(0, len(completions), body.n)]
    return envelope(
        kind, rid, model, choices, usage=usage(groups), system_fingerprint=None, gearshift=_report(completions, run)
    )


def _report(completions: list[Completion], run: Run) -> dict:
    return {**engine_report(completions, run.label), **run.extra}


async def _collect(run: Run, choices: int, http: HTTPRequest) -> list[Completion] | None:
    """Wait for every completion; a client that disconnects meanwhile aborts them all (None)."""

    async def gather() -> list[Completion]:
        done: dict[int, Completion] = {}
        events = run.events()
        try:
            async for i, out in events:
                if out.completion is not None:
                    done[i] = out.completion
        finally:
            await events.aclose()
        if len(done) < choices:
            raise RuntimeError("no completion")
        return [done[i] for i in range(choices)]

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await http.is_disconnected():
                run.abort()
                task.cancel()
                return None
    except asyncio.CancelledError:
        run.abort()
        task.cancel()
        raise
    except APIError:
        raise
    except Exception as e:
        raise APIError(500, f"generation failed: {e}", type="server_error") from None


async def _stream(
    run: Run,
    choices: int,
    n: int,
    kind: str,
    rid: str,
    model: str,
    include_usage: bool,
    chat: bool,
    with_logprobs: bool,
) -> AsyncIterator[str]:
    """OpenAI's chunks: (chat) a role delta per choice first, content deltas, a chunk with the
    finish_reason per choice, the usage chunk when asked, then `[DONE]`. An engine failure (or a
    replica lost mid-stream) ends the stream with an error event, then `[DONE]`. Leaving early (the
    client went away) aborts every sequence of the request."""
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict | str, finish: str | None = None, lp: dict | None = None, **more) -> str:
        if chat:
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}
        return sse(envelope(kind, rid, model, [choice], system_fingerprint=None, **extra, **more))

    completions: dict[int, Completion] = {}
    offsets = [0] * choices
    events = run.events()
    try:
        if chat:
            for i in range(choices):
                yield chunk(i, {"role": "assistant", "content": ""})
        try:
            async for i, out in events:
                lp = None
                if with_logprobs and out.logprobs:
                    lp = chat_logprobs(out.logprobs) if chat else completion_logprobs(out.logprobs, offsets[i])
                if out.text or lp:
                    yield chunk(i, {"content": out.text} if chat else out.text, None, lp)
                    offsets[i] += len(out.text)
                if out.completion is not None:
                    completions[i] = out.completion
                    yield chunk(
                        i, {} if chat else "", out.completion.finish_reason, gearshift=_report([out.completion], run)
                    )
        except Exception as e:
            yield sse({"error": APIError(500, f"generation failed: {e}", type="server_error").body()["error"]})
        else:
            if include_usage and len(completions) == choices:
                done = [completions[i] for i in range(choices)]
                groups = [done[j : j + n] for j in range(0, len(done), n)]
                yield sse(
                    {
                        **envelope(kind, rid, model, [], system_fingerprint=None),
                        "usage": usage(groups),
                        "gearshift": _report(done, run),
                    }
                )
        yield sse("[DONE]")
    finally:
        if len(completions) < choices:
            run.abort()
        await events.aclose()


def default_model_name(path: str | Path) -> str:
    """The name clients send as `model`: the file's name without `.gguf` (or the folder's name)."""
    p = Path(path)
    return p.name[:-5] if p.name.endswith(".gguf") else p.name
