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
next to the model that uses them, when the host starts), so a bad `speculative_config` is refused
by the same code on either side.
"""

from __future__ import annotations

import asyncio
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

TRAINING_FREE = ("lookup", "suffix", "recycling", "hybrid", "early-exit")  # plus early-exit:L for every L


def queue_full() -> APIError:
    """The 503 for a server (one engine, or the replicas' front) with no room left to queue."""
    return APIError(
        503,
        "the server is at capacity: too many requests are waiting; retry shortly",
        type="service_unavailable",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


class EngineHost:
    """An LLM, the AsyncEngine stepping it, and the one way a Job becomes its running requests.

    Requests choose among strategies, never build them: every drafter a request may name is built
    here, once, when the host starts (in the loader thread, before /health says ok): the
    training-free ones (lookup, suffix, recycling, hybrid, early-exit:L; the tree drafters measure
    the forward-cost curve then) and those the operator offers (`--speculative-config`, which may
    name draft models and trained heads). Anything else, a path above all, is a 400 that names no
    file, so no request loads a file, waits for a build, or learns what exists on the server.
    """

    def __init__(
        self,
        llm: LLM,
        metrics: Metrics,
        max_queue: int,
        default: Strategy | None = None,
        offered: list[Strategy] | None = None,
    ):
        self.llm = llm
        self.max_queue = max_queue
        strategies = [s for s in [default, *(offered or [])] if s is not None]
        n_layers = llm.model.cfg.n_layers
        names = [*TRAINING_FREE, *(f"early-exit:{n}" for n in range(1, n_layers))]
        names += [s.drafter for s in strategies if s.drafter] + [s.ead.small for s in strategies if s.ead]
        self.drafters = {name: llm.drafter(name) for name in dict.fromkeys(names)}  # (a bad offer fails here)
        for s in strategies:
            self.factory(s)  # refuses bad combinations (ead with a drafter that is no model) at start
        self.engine = AsyncEngine(llm.core, metrics, max_queue)

    def factory(self, s: Strategy):
        """The request's strategy factory, from drafters built at start; a 400 for any other."""
        for name in filter(None, (s.drafter, s.ead.small if s.ead else None)):
            if name not in self.drafters:
                raise APIError(
                    400,
                    "speculative_config names a drafter this server does not offer: a request may "
                    "choose ngram (lookup), suffix, recycling, hybrid, early-exit (num_layers from 1 to "
                    f"{self.llm.model.cfg.n_layers - 1}), ead or ead+verify with one of those as small, "
                    "none, or a strategy the server was started with (--speculative-config)",
                    param="speculative_config",
                    code="drafter_not_offered",
                )
        try:
            return self.llm.strategy(self.drafters.get(s.drafter), s.ead, s.k)  # only looks up built drafters
        except GearshiftError as e:
            raise APIError(400, str(e), param="speculative_config") from None

    def requests(self, job: Job) -> list[Request]:
        make = self.factory(job.strategy)
        window = self.llm.core.window
        out = []
        for ids in job.prompts:
            try:
                out += self.llm.requests(
                    ids,
                    n=job.n,
                    kv_policy=job.kv,
                    max_tokens=job.max_tokens or window - len(ids),
                    make=make,
                    **job.params,
                )
            except GearshiftError as e:
                raise APIError(400, str(e)) from None
        return out

    def submit(self, job: Job) -> list[Handle]:
        """Queue the job's requests (all or none); an APIError for the client otherwise."""
        requests = self.requests(job)
        room = self.engine.core.config.max_num_seqs + self.max_queue
        if len(requests) > room:  # it would wait for room that never comes: not a retry-later
            raise APIError(
                400,
                f"this request needs {len(requests)} sequences at once (n x prompts) but this server "
                f"holds at most {room} ({self.engine.core.config.max_num_seqs} running and "
                f"{self.max_queue} waiting)",
                param="n",
                code="request_too_large",
            )
        try:
            return self.engine.submit(requests)
        except QueueFull:
            raise queue_full() from None

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
    def __init__(
        self,
        llm: LLM,
        metrics: Metrics,
        max_queue: int,
        default: Strategy | None = None,
        offered: list[Strategy] | None = None,
    ):
        self.llm = llm
        self.host = EngineHost(llm, metrics, max_queue, default, offered)
        self.tokenizer = llm.tokenizer
        self.window = llm.core.window
        self.vocab_size = llm.model.cfg.vocab_size

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.llm.encode(prompt)

    async def start(self, job: Job) -> LocalRun:
        return LocalRun(self.host.engine, self.host.submit(job), job.strategy.label)

    def stop(self) -> None:
        self.host.stop()
