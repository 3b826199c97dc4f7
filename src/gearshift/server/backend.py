"""What the HTTP routes run requests on: one engine in this process, or replicas behind Ray Serve.

The routes (`app.py`) read an OpenAI body into a `Job`: token ids, sampling settings, strategy and
KV policy, all plain picklable data checked against nothing but the tokenizer and the context
window. A `Backend` starts a job and hands back a `Run`, whose events are `(choice index,
StepOutput)` pairs until every choice has its completion. Both backends meet the routes at that
line, so the OpenAI shapes (responses, chunks, usage, errors) have one implementation:

- `LocalBackend`: an `EngineHost` in this process (`gearshift serve`);
- `cluster.RayBackend`: the same `EngineHost` inside each Ray Serve replica, reached through a
  streaming deployment handle (`gearshift serve --replicas N`).

`EngineHost` is where a job becomes engine requests (drafters, EAD and the KV policy are built
next to the model that uses them), so a bad `speculative_config` is refused by the same code on
either side.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import GearshiftError
from ..kv_policy import KVPolicy
from ..llm import LLM
from ..sequence import Request, StepOutput
from ..tokenizer import Tokenizer
from .engine import AsyncEngine, Handle, QueueFull
from .metrics import Metrics
from .protocol import APIError, Strategy


@dataclass
class Job:
    """One API request as an engine needs it; plain data, so it can travel to another process."""
    prompts: list[list[int]]
    params: dict  # SamplingParams fields shared by every prompt (max_tokens is per prompt)
    max_tokens: int | None  # None: up to the context window
    n: int = 1
    strategy: Strategy = field(default_factory=Strategy)
    kv: KVPolicy | None = None
    stream: bool = False
    avoid: tuple[str, ...] = ()  # replicas that already failed this job (the cluster's router skips them)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Accepted:
    """A replica's first event: the job is queued on its engine."""
    replica: str


@dataclass
class Refused:
    """A replica's only event when it refuses a job: the client's error, in picklable form."""
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    @classmethod
    def of(cls, e: APIError) -> "Refused":
        return cls(e.status, e.message, e.type, e.param, e.code, e.headers)

    def error(self) -> APIError:
        return APIError(self.status, self.message, self.type, self.param, self.code, self.headers)


class Run(Protocol):
    label: str  # the strategy's name, for the `gearshift` report
    extra: dict  # more for the report (the cluster adds which replica served it)

    def events(self) -> AsyncIterator[tuple[int, StepOutput]]: ...

    def abort(self) -> None: ...


class Backend(Protocol):
    tokenizer: Tokenizer
    window: int
    vocab_size: int

    def encode(self, prompt: str | list[int]) -> list[int]: ...

    async def start(self, job: Job) -> Run: ...

    def stop(self) -> None: ...


# ------------------------------------------------------------------ the engine side

class EngineHost:
    """An LLM, the AsyncEngine stepping it, and the one way a Job becomes its running requests."""

    def __init__(self, llm: LLM, metrics: Metrics, max_queue: int, default: Strategy | None = None):
        self.llm = llm
        self.lock = threading.Lock()
        if default is not None and (default.drafter or default.ead):
            self.strategy(default)  # a bad server-wide drafter fails at start, not per request
        self.engine = AsyncEngine(llm.core, metrics, max_queue)

    def strategy(self, s: Strategy):
        """The drafter (None: plain) and EAD settings of a strategy, each drafter built once per name
        and cap under a lock (requests arrive concurrently), and checked by building its factory once."""
        with self.lock:
            drafter = self.llm.drafter(s.drafter, s.k) if s.drafter else None
            self.llm.strategy(drafter, s.ead)  # builds EAD's small model too, and refuses bad combinations
        return drafter, s.ead

    def requests(self, job: Job) -> list[Request]:
        try:
            drafter, ead = self.strategy(job.strategy)
        except GearshiftError as e:
            raise APIError(400, str(e), param="speculative_config") from None
        window = self.llm.core.window
        out = []
        for ids in job.prompts:
            try:
                out += self.llm.requests(ids, drafter, ead, n=job.n, kv_policy=job.kv,
                                         max_tokens=job.max_tokens or window - len(ids), **job.params)
            except GearshiftError as e:
                raise APIError(400, str(e)) from None
        return out

    def submit(self, job: Job) -> list[Handle]:
        """Queue the job's requests (all or none); an APIError for the client otherwise."""
        requests = self.requests(job)
        try:
            return self.engine.submit(requests)
        except QueueFull:
            raise APIError(503, "the server is at capacity: too many requests are waiting; retry shortly",
                           type="service_unavailable", code="queue_full", headers={"Retry-After": "1"}) from None

    def stop(self) -> None:
        self.engine.stop()


async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Every handle's outputs as they come, as (index, output), until each has its completion; the
    first engine error is raised. Leaving early stops listening (the caller aborts the handles)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for out in h.outputs():
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    done = 0
    try:
        while done < len(handles):
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            if out.completion is not None:
                done += 1
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


# ------------------------------------------------------------------ one engine in this process

@dataclass
class LocalRun:
    engine: AsyncEngine
    handles: list[Handle]
    label: str
    extra: dict = field(default_factory=dict)

    def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        return merged(self.handles)

    def abort(self) -> None:
        self.engine.abort(self.handles)


class LocalBackend:
    def __init__(self, llm: LLM, metrics: Metrics, max_queue: int, default: Strategy | None = None):
        self.llm = llm
        self.host = EngineHost(llm, metrics, max_queue, default)
        self.tokenizer = llm.tokenizer
        self.window = llm.core.window
        self.vocab_size = llm.model.cfg.vocab_size

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.llm.encode(prompt)

    async def start(self, job: Job) -> LocalRun:
        return LocalRun(self.host.engine, self.host.submit(job), job.strategy.label)

    def stop(self) -> None:
        self.host.stop()
