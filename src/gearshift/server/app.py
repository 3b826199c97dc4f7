"""`gearshift serve`: the OpenAI-compatible HTTP face of the engine (FastAPI + uvicorn).

Endpoints: `/v1/chat/completions`, `/v1/completions` (streamed as server-sent events exactly as
OpenAI sends them), `/v1/models`, `/tokenize`, `/detokenize`, `/health` (503 until the model is
loaded), `/metrics` (Prometheus) and the chat page at `/`. The model loads in a thread after the
server starts listening, so `/health` answers from the first moment.
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

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GearshiftError
from ..kv_policy import POLICIES, KVPolicy
from ..llm import LLM
from ..sequence import Completion, Request
from .engine import AsyncEngine, Handle, QueueFull
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, Strategy, TokenizeRequest,
                       chat_logprobs, check_supported, completion_logprobs, engine_report, envelope,
                       messages_as_dicts, new_id, parse_speculative_config, sse, usage)

log = logging.getLogger("gearshift.server")


@dataclass
class ServerConfig:
    model_name: str = "gearshift"
    api_key: str | None = None
    max_queue: int = 256  # requests that may wait for a slot beyond max_num_seqs; more get 503
    speculative: Strategy = field(default_factory=Strategy)  # the server-wide default; a request may choose its own


class State:
    """What the routes share: the engine once loaded (None while loading), or why loading failed."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics(config.model_name)
        self.llm: LLM | None = None
        self.engine: AsyncEngine | None = None
        self.error: str | None = None
        self.drafter_lock = threading.Lock()

    def ready(self) -> tuple[LLM, AsyncEngine]:
        if self.engine is None:
            raise APIError(503, f"the model is not available: {self.error}" if self.error else "the model is loading",
                           type="service_unavailable", headers={"Retry-After": "1"})
        return self.llm, self.engine


def create_app(load: Callable[[], LLM], config: ServerConfig | None = None) -> FastAPI:
    """The app; `load` builds the LLM (called in a thread once the server is up)."""
    config = config or ServerConfig()
    state = State(config)

    def loader() -> None:
        try:
            llm = load()
            if config.speculative.drafter or config.speculative.ead:
                _strategy(state, llm, config.speculative)  # a bad server-wide drafter fails now, not per request
            state.llm = llm
            state.engine = AsyncEngine(llm.core, state.metrics, config.max_queue)
            log.info("model ready")
        except Exception as e:
            state.error = str(e)
            log.error("loading failed: %s", e)

    async def lifespan(app: FastAPI):
        threading.Thread(target=loader, name="gearshift-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="gearshift", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gearshift = state

    # -------------------------------------------------------------- errors in OpenAI's envelope

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        elif first.get("type") == "missing" and not loc:
            message, param = "the request needs a JSON body", None
        else:
            param = ".".join(x for x in loc if not x.isdigit() or len(loc) == 1) or None
            where = ".".join(loc) or "body"
            message = f"{where}: {first['msg']}"
            if "input" in first and first.get("type") != "missing":
                message += f" (got {json.dumps(first['input'], default=str)[:80]})"
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(GearshiftError)
    async def bad_input(request: HTTPRequest, e: GearshiftError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    def authorize(request: HTTPRequest) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not token:
            raise APIError(401, "missing API key: send it as `Authorization: Bearer KEY`",
                           type="authentication_error", code="invalid_api_key")
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{config.model_name}`",
                           type="not_found_error", param="model", code="model_not_found")

    # -------------------------------------------------------------- plain endpoints

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "error", "error": state.error} if state.error else {"status": "loading"},
                                status_code=503)
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
        llm, engine = state.ready()
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "gearshift", "max_model_len": engine.core.window}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: HTTPRequest):
        authorize(request)
        check_model(body.model)
        llm, engine = state.ready()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = llm.tokenizer.encode_chat(messages_as_dicts(body.messages), body.add_generation_prompt)
        else:
            ids = llm.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.core.window, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: HTTPRequest):
        authorize(request)
        check_model(body.model)
        llm, _ = state.ready()
        vocab = llm.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # -------------------------------------------------------------- completions

    def accept(body, request: HTTPRequest) -> LLM:
        """The checks every completion request passes before its prompt is read."""
        authorize(request)
        check_model(body.model)
        check_supported(body)
        return state.ready()[0]

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        llm = accept(body, request)
        try:
            ids = llm.tokenizer.encode_chat(messages_as_dicts(body.messages), body.add_generation_prompt)
        except GearshiftError as e:
            raise APIError(400, str(e), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _run(state, request, body, [ids], max_tokens, logprobs, chat=True)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: HTTPRequest):
        llm = accept(body, request)
        p = body.prompt
        many = bool(p) and not isinstance(p, str) and not isinstance(p[0], int)  # a list of prompts
        try:  # text is tokenized, ids are range-checked, as LLM.generate does
            prompts = [llm.encode(x) for x in (p if many else [p])]
        except GearshiftError as e:
            raise APIError(400, str(e), param="prompt") from None
        return await _run(state, request, body, prompts, body.max_tokens, body.logprobs, chat=False)

    return app


# ------------------------------------------------------------------ one request, start to end

def _strategy(state: State, llm: LLM, s: Strategy):
    """The drafter (None: plain) and EAD settings of a strategy, each drafter built once per name and
    cap under a lock (requests arrive concurrently), and checked by building its factory once."""
    with state.drafter_lock:
        drafter = llm.drafter(s.drafter, s.k) if s.drafter else None
        llm.strategy(drafter, s.ead)  # builds EAD's small model too, and refuses bad combinations
    return drafter, s.ead


def _requests(state: State, llm: LLM, body, prompts: list[list[int]], max_tokens: int | None,
              logprobs: int | None) -> tuple[list[Request], str]:
    window = llm.core.window
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    for ids in prompts:
        asked = max_tokens if max_tokens is not None else 0
        if len(ids) + asked > window or len(ids) >= window:
            raise APIError(400, f"this model's maximum context length is {window} tokens, but {len(ids) + asked} were "
                           f"requested ({len(ids)} in the {param}, {asked} in the completion); reduce the length of "
                           f"the {param} or max_tokens", param=param, code="context_length_exceeded")
    strategy = state.config.speculative
    if body.speculative_config is not None:
        try:
            strategy = parse_speculative_config(body.speculative_config)
        except GearshiftError as e:
            raise APIError(400, str(e), param="speculative_config") from None
    try:
        drafter, ead = _strategy(state, llm, strategy)
    except GearshiftError as e:
        raise APIError(400, str(e), param="speculative_config") from None
    try:
        kv = KVPolicy.of(body.kv_policy, body.kv_budget)
    except GearshiftError as e:
        raise APIError(400, str(e), param="kv_budget" if body.kv_policy in POLICIES else "kv_policy") from None
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    requests = []
    for ids in prompts:
        params = dict(max_tokens=max_tokens or window - len(ids), temperature=body.temperature if body.temperature
                      is not None else 1.0, top_p=body.top_p if body.top_p is not None else 1.0, top_k=top_k,
                      stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs)
        try:
            requests += llm.requests(ids, drafter, ead, n=body.n, seed=body.seed, kv_policy=kv, **params)
        except GearshiftError as e:
            raise APIError(400, str(e)) from None
    return requests, strategy.label


async def _run(state: State, http: HTTPRequest, body, prompts: list[list[int]], max_tokens: int | None,
               logprobs: int | None, chat: bool):
    llm, engine = state.ready()
    requests, label = _requests(state, llm, body, prompts, max_tokens, logprobs)
    try:
        handles = engine.submit(requests)
    except QueueFull:
        raise APIError(503, "the server is at capacity: too many requests are waiting; retry shortly",
                       type="service_unavailable", code="queue_full", headers={"Retry-After": "1"}) from None
    kind = "chat.completion" if chat else "text_completion"
    rid = new_id("chatcmpl" if chat else "cmpl")
    model = state.config.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(engine, handles, body.n, kind + ".chunk" if chat else kind, rid, model, label, include_usage,
                      chat, logprobs is not None)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completions = await _collect(engine, handles, http)
    if completions is None:
        return Response(status_code=499)  # the client is gone: nobody reads this
    choices = []
    for i, c in enumerate(completions):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
                            "finish_reason": c.finish_reason})
        else:
            choices.append({"index": i, "text": c.text, "finish_reason": c.finish_reason,
                            "logprobs": completion_logprobs(c.logprobs) if logprobs is not None else None})
    groups = [completions[i:i + body.n] for i in range(0, len(completions), body.n)]
    return envelope(kind, rid, model, choices, usage=usage(groups), system_fingerprint=None,
                    gearshift=engine_report(completions, label))


async def _collect(engine: AsyncEngine, handles: list[Handle], http: HTTPRequest) -> list[Completion] | None:
    """Wait for every completion; a client that disconnects meanwhile aborts them all (None)."""
    async def one(h: Handle) -> Completion:
        async for out in h.outputs():
            if out.completion is not None:
                return out.completion
        raise RuntimeError("no completion")

    task = asyncio.gather(*(one(h) for h in handles))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await http.is_disconnected():
                engine.abort(handles)
                task.cancel()
                return None
    except asyncio.CancelledError:
        engine.abort(handles)
        task.cancel()
        raise
    except Exception as e:
        raise APIError(500, f"generation failed: {e}", type="server_error") from None


async def _stream(engine: AsyncEngine, handles: list[Handle], n: int, kind: str, rid: str, model: str, label: str,
                  include_usage: bool, chat: bool, with_logprobs: bool) -> AsyncIterator[str]:
    """OpenAI's chunks: (chat) a role delta per choice first, content deltas, a chunk with the
    finish_reason per choice, the usage chunk when asked, then `[DONE]`. Leaving early (the client
    went away) aborts every sequence of the request."""
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict | str, finish: str | None = None, lp: dict | None = None, **more) -> str:
        if chat:
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}
        return sse(envelope(kind, rid, model, [choice], system_fingerprint=None, **extra, **more))

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for out in h.outputs():
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    completions: dict[int, Completion] = {}
    offsets = [0] * len(handles)
    try:
        if chat:
            for i in range(len(handles)):
                yield chunk(i, {"role": "assistant", "content": ""})
        while len(completions) < len(handles):
            i, out = await queue.get()
            if isinstance(out, Exception):
                yield sse({"error": APIError(500, f"generation failed: {out}", type="server_error").body()["error"]})
                break
            lp = None
            if with_logprobs and out.logprobs:
                lp = chat_logprobs(out.logprobs) if chat else completion_logprobs(out.logprobs, offsets[i])
            if out.text or lp:
                yield chunk(i, {"content": out.text} if chat else out.text, None, lp)
                offsets[i] += len(out.text)
            if out.completion is not None:
                completions[i] = out.completion
                yield chunk(i, {} if chat else "", out.completion.finish_reason,
                            gearshift=engine_report([out.completion], label))
        else:
            if include_usage:
                done = [completions[i] for i in range(len(handles))]
                groups = [done[j:j + n] for j in range(0, len(done), n)]
                yield sse({**envelope(kind, rid, model, [], system_fingerprint=None), "usage": usage(groups),
                           "gearshift": engine_report(done, label)})
        yield sse("[DONE]")
    finally:
        if len(completions) < len(handles):
            engine.abort(handles)
        for t in tasks:
            t.cancel()


def default_model_name(path: str | Path) -> str:
    """The name clients send as `model`: the file's name without `.gguf` (or the folder's name)."""
    p = Path(path)
    return p.name[:-5] if p.name.endswith(".gguf") else p.name
