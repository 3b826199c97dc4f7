"""The engine core behind an event loop: one thread owns `EngineCore` and steps it; requests reach
it through a command list, and their outputs come back to each request's asyncio queue.

Only the engine thread touches the core (adds, aborts, steps), so the core needs no locks, and a
step is never interrupted by a request arriving: new requests join at the next step boundary, as
in llama.cpp's server loop and vLLM's engine core. An abort (a client that went away) is applied
before the next step, so its slot is free for whoever waits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..core import EngineCore
from ..sequence import Request, StepOutput
from .metrics import Metrics

log = logging.getLogger("gearshift.server")


class QueueFull(Exception):
    pass


class SequenceFailed(Exception):
    """One sequence's own work raised (`EngineCore._isolated`); the others went on."""


@dataclass
class Handle:
    """One request's end of the pipe: its outputs arrive on `queue` (an Exception if the engine failed)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    cancelled: bool = False
    done: bool = False
    last_output: float | None = None  # when its last tokens came out (inter-token latency)

    async def outputs(self) -> AsyncIterator[StepOutput]:
        while True:
            out = await self.queue.get()
            if isinstance(out, Exception):
                raise out
            yield out
            if out.completion is not None:
                return


class AsyncEngine:
    def __init__(self, core: EngineCore, metrics: Metrics, max_queue: int):
        self.core, self.metrics, self.max_queue = core, metrics, max_queue
        self._cv = threading.Condition()
        self._new: list[Handle] = []
        self._aborts: list[Handle] = []
        self._live: dict[int, Handle] = {}
        self._stopping = False
        self.in_flight = 0  # requests accepted and not finished: the queue-full test
        metrics.watch(lambda: core.running, lambda: core.waiting + len(self._new), core.kv_held)
        self._thread = threading.Thread(target=self._run, name="gearshift-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from the event loop

    def submit(self, requests: list[Request]) -> list[Handle]:
        """Queue requests (all or none); QueueFull when more than max_num_seqs + max_queue would be in flight."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if self.in_flight + len(requests) > self.core.config.max_num_seqs + self.max_queue:
                raise QueueFull
            handles = [Handle(r, loop) for r in requests]
            self.in_flight += len(handles)
            self._new += handles
            self._cv.notify()
        return handles

    def abort(self, handles: list[Handle]) -> None:
        """End requests now (a client went away); their slots are free before the next step."""
        with self._cv:
            for h in handles:
                if not h.done and not h.cancelled:
                    h.cancelled = True
                    self._aborts.append(h)
            self._cv.notify()

    @property
    def alive(self) -> bool:
        """Whether the engine thread still steps (a replica's health check)."""
        return self._thread.is_alive() and not self._stopping

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while not (self._new or self._aborts or core.has_work() or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    break
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
            for h in new:
                if h.cancelled:
                    self._retire(h)
                    continue
                try:
                    h.seq_id = core.add(h.request)
                except Exception as e:  # the app checks requests first; this is the last line of defence
                    self._retire(h)
                    _send(h, e)
                    continue
                self._live[h.seq_id] = h
            for h in aborts:
                if h.seq_id is not None and h.seq_id in self._live:
                    core.abort(h.seq_id)
            if not core.has_work():
                continue
            try:
                outputs = core.step()
            except Exception as e:  # a bug, not a client's fault: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            now = time.perf_counter()
            for out in outputs:
                if (h := self._live.get(out.seq_id)) is not None:
                    self._deliver(h, out, now)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _deliver(self, h: Handle, out: StepOutput, now: float) -> None:
        if out.token_ids:
            if h.last_output is None:
                self.metrics.first_token(now - h.request.arrival, len(h.request.prompt))
                self.metrics.tokens(len(out.token_ids), None)
            else:
                self.metrics.tokens(len(out.token_ids), now - h.last_output)
            h.last_output = now
        if out.completion is not None:
            self.metrics.finished(out.completion, now - h.request.arrival)
            del self._live[out.seq_id]
            self._retire(h)
        if not h.cancelled:
            failed = out.completion is not None and out.completion.finish_reason == "error"
            _send(h, SequenceFailed(out.completion.error) if failed else out)

    def _retire(self, h: Handle) -> None:
        h.done = True
        with self._cv:
            self.in_flight -= 1

    def _fail_all(self, error: Exception) -> None:
        for seq_id, h in list(self._live.items()):
            try:
                self.core.abort(seq_id)
            except Exception:
                log.exception("abort after a failed step")
            self._retire(h)
            _send(h, error)
        self._live.clear()
        try:
            self.core.step()  # flush the aborted sequences' outputs, so no slot stays taken
        except Exception:
            log.exception("flushing aborted sequences")
        with self._cv:
            pending, self._new = self._new, []
        for h in pending:
            self._retire(h)
            _send(h, error)


def _send(h: Handle, item: StepOutput | Exception) -> None:
    """Hand an output to the request's event loop (gone at shutdown: then nobody is listening)."""
    try:
        h.loop.call_soon_threadsafe(h.queue.put_nowait, item)
    except RuntimeError:
        pass
