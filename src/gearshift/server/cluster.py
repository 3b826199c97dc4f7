"""`gearshift serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI endpoint.

One Ray Serve application, "gearshift", of two deployments:

- `EngineReplica` (N replicas, `threads` CPUs each): an `EngineHost` (`backend.py`: the model,
  its AsyncEngine, its prefix cache), whose streaming method `generate(job)` answers `Accepted`
  (or `Refused`, the client's error) and then every `(choice, StepOutput)` the engine produces;
- `Front` (one replica, no CPU reserved): the HTTP ingress, the very app `gearshift serve` runs
  (`app.create_backend_app`) on a `RayBackend`, so the OpenAI API, streaming and errors are the
  same code; it reads the tokenizer from a replica at start and never loads the weights.

Routing is Ray Serve's own request-router API (`RequestRouterConfig(request_router_class=...)`,
as Ray's `PrefixCacheAffinityRouter` uses it), not one deployment per replica with a home-made
dispatcher: Serve hands `GearshiftRequestRouter` the live replica set (a replica the controller
restarts appears under a new id, a dead one is dropped), each replica's queue length, and takes
care of capacity (`max_ongoing_requests`) and back-off; the router only ranks the replicas
(`routing.Router`: cache-aware or round-robin). It runs inside the front's process (Serve builds
it in the handle), so the front can tell it, through `routing.shared_router`, what a finished
answer left in a replica's cache.

Faults: Ray Serve's controller restarts a replica whose actor dies or whose `check_health` fails.
A request whose replica is lost before it has sent anything to the client (a streamed request
before its first token; a non-streamed request at any point, since its answer is only sent once
complete) is sent again, to another replica; a stream already under way ends with an error event
and `[DONE]`. Other requests never notice.

Scale: `start(ClusterConfig(...))` starts a local Ray instance, or joins a cluster with
`ray_address` (then replicas are placed on whichever nodes have the CPUs; the model path and
gearshift must exist on each node).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..sequence import Completion, StepOutput
from ..tokenizer import encode_prompt
from .app import ServerConfig, create_backend_app
from .backend import Accepted, EngineHost, Job, Refused, merged, queue_full
from .metrics import Metrics
from .protocol import APIError
from .routing import Decision, Router, RoutingConfig, shared_router

log = logging.getLogger("gearshift.server")

APP = "gearshift"
LOST = (RayActorError, ReplicaUnavailableError)  # the replica's process is gone (or unreachable)


@dataclass
class ClusterConfig:
    """Everything `gearshift serve --replicas` needs; plain data, shipped to the replicas."""

    replicas: int = 2
    threads: int = 1  # CPU threads (and Ray CPUs) per replica
    model: str | None = None  # a path every node can read; None: the default model (pulled on each node)
    device: str | None = None
    weights: str = "auto"
    engine: dict = field(default_factory=dict)  # EngineConfig options (max_num_seqs, ...)
    server: ServerConfig = field(default_factory=ServerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None  # None: start a local Ray instance
    home: str | None = None  # $GEARSHIFT_HOME for the replicas (None: theirs)
    retries: int = 2  # times a request is sent again after its replica was lost before it started
    log_level: str = "warning"

    @property
    def slots(self) -> int:
        """Requests one replica takes before Serve holds more back: its slots plus its queue."""
        return self.engine.get("max_num_seqs", 8) + self.server.max_queue


# ------------------------------------------------------------------ routing inside Ray Serve


def _key(app: str, deployment: str) -> str:
    return f"{app}#{deployment}"


def _job(pending: PendingRequest | None) -> Job | None:
    if pending is None or not pending.args or not isinstance(pending.args[0], Job):
        return None
    return pending.args[0]


STALE_S = 5.0  # a request ranked for a busy replica may take another after waiting this long


class GearshiftRequestRouter(RequestRouter):
    """Ranks EngineReplica replicas for each job with `routing.Router`: the chosen one first, the
    rest (least loaded first) after it, so Serve falls back when the first is at capacity."""

    # A CPU replica whose cores are all decoding answers Serve's queue-length probe late; Serve's
    # 0.1 s (doubling up to 1 s) then fails every probe, and routing stalls until the load drops.
    queue_len_response_deadline_s = 0.5
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(self, **routing) -> None:
        self.router = shared_router(
            _key(self._deployment_id.app_name, self._deployment_id.name), RoutingConfig(**routing)
        )
        self.decisions: collections.OrderedDict[str, Decision] = collections.OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            # Serve runs routing tasks without a request of their own (its queue is cleaned lazily,
            # and a task may give its request up when there are more tasks than requests); such
            # a task routes the oldest waiting request (see _fulfill_next_pending_request), so
            # rank for that one. With nothing waiting, pause: these tasks loop until the queue
            # drains, and must not spin the router's event loop meanwhile.
            pending_request = self._oldest_pending()
            if pending_request is None:
                await asyncio.sleep(0.02)
                return [candidate_replicas]
        job = _job(pending_request)
        if job is None or not candidate_replicas:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # all at capacity: back off, don't spin
        usable = [r for r in candidate_replicas if r.replica_id.unique_id not in job.avoid] or candidate_replicas
        loads = await self._loads(usable)
        decision = self.router.choose(job.prompts[0], loads)
        log.debug("routing %d tokens, loads %s: %s", len(job.prompts[0]), loads, decision)
        self.decisions[pending_request.metadata.internal_request_id] = decision
        while len(self.decisions) > 10_000:  # requests cancelled before they were routed
            self.decisions.popitem(last=False)
        by_id = {r.replica_id.unique_id: r for r in usable}
        return [[by_id[decision.order[0]]], [by_id[r] for r in decision.order[1:]]]

    def _waiting_for(self, replica: str) -> PendingRequest | None:
        """Which waiting request a replica found by a task without a request of its own goes to: one
        ranked for that replica, else (so that nothing waits for long) the oldest that has waited
        `STALE_S`, else one that no cached prefix ties elsewhere, else none: the task routes again.
        Giving it to the oldest request, as before, let a chat's next turn land on the replica that
        did not hold it: a task ranked for the oldest request, another task served that one first,
        and the replica went to the next, ranked for the other replica."""
        waiting = [pr for pr in self._pending_requests_to_fulfill if not pr.future.done()]
        decided = [(pr, self.decisions.get(pr.metadata.internal_request_id)) for pr in waiting]
        for pr, d in decided:
            if d is not None and d.order[0] == replica:
                return pr
        stale = next((pr for pr in waiting if time.time() - pr.created_at > STALE_S), None)
        if stale is not None:  # first, so that newer traffic cannot keep passing it over
            return stale
        return next((pr for pr, d in decided if d is None or d.reason != "cache"), None)

    def _oldest_pending(self) -> PendingRequest | None:
        for pr in self._pending_requests_to_fulfill:
            if not pr.future.done():
                return pr
        return None

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give the replica to the request it was chosen for; a task without a request of its own
        gives it to a waiting one (`_waiting_for`; Serve's base class would give it to nobody, and a
        request whose task gave it up could wait forever)."""
        pr = self._get_pending_request_matching_internal_request_id(request_metadata)
        if pr is None and request_metadata is None:
            pr = self._waiting_for(replica.replica_id.unique_id)
        if pr is not None:
            self._record_queue_wait_time(pr)
            pr.future.set_result(replica)
            self._remove_pending_request_from_indices(pr)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Requests in flight per replica, as the one front counts them (`Router.in_flight`): exact and
        current, where Serve's queue-length probes are cached a while, and a probe that a busy
        replica answers late used to count it as full."""
        return {r.replica_id.unique_id: self.router.in_flight.get(r.replica_id.unique_id, 0) for r in replicas}

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        job = _job(pending_request)
        if job is None:
            return
        decision = self.decisions.pop(pending_request.metadata.internal_request_id, None)
        rid = replica_id.unique_id
        reason = None if decision is None else decision.reason if decision.order[0] == rid else "full"
        self.router.routed(job.prompts[0], rid, reason)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.router.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.router.retain(r.replica_id.unique_id for r in replicas)


# ------------------------------------------------------------------ the deployments


@serve.deployment
class EngineReplica:
    """One engine: loads the model with `threads` threads and streams the jobs it is sent."""

    def __init__(self, config: ClusterConfig):
        if config.home:
            os.environ["GEARSHIFT_HOME"] = config.home
        import torch

        from ..llm import load

        torch.set_num_threads(config.threads)
        llm = load(config.model, device=config.device, weights=config.weights, **config.engine)
        self.host = EngineHost(
            llm,
            Metrics(config.server.model_name),
            config.server.max_queue,
            config.server.speculative,
            config.server.offered,
        )
        self.id = serve.get_replica_context().replica_id.unique_id

    async def info(self) -> dict:
        llm = self.host.llm
        return {"tokenizer": llm.tokenizer, "window": llm.core.window, "vocab_size": llm.model.cfg.vocab_size}

    async def generate(self, job: Job) -> AsyncIterator[Accepted | Refused | tuple[int, StepOutput]]:
        try:
            handles = self.host.submit(job)
        except APIError as e:
            yield Refused.of(e)
            return
        yield Accepted(self.id)
        finished = False
        try:
            async for event in merged(handles):
                yield event
            finished = True
        finally:  # cancelled (the client left) or failed: free the slots now
            if not finished:
                self.host.engine.abort(handles)

    async def check_health(self) -> None:
        if not self.host.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()


@serve.deployment
@serve.ingress()
class Front:
    """The HTTP ingress: `gearshift serve`'s app on the replicas."""

    async def __init__(self, replicas, config: ClusterConfig):
        self.replicas, self.config = replicas, config
        self.info = await replicas.info.remote()  # the tokenizer and window, from whichever replica

    def __serve_build_asgi_app__(self):
        self.built = create_backend_app(
            lambda metrics: RayBackend(self.replicas, self.info, metrics, self.config), self.config.server
        )
        return self.built

    async def check_health(self) -> None:
        """Serve reports a front whose backend failed to start (rather than a 503 forever)."""
        app = getattr(self, "built", None)
        if app is not None and app.state.gearshift.error:
            raise RuntimeError(f"the backend did not start: {app.state.gearshift.error}")


# ------------------------------------------------------------------ the front's backend


class ReplicaLost(Exception):
    pass


class _Decisions:
    """`gearshift:router_decisions_total{reason}`: why requests went where they went (cache, load,
    balance, round-robin, or full: the first choice was at capacity)."""

    def __init__(self, router: Router, model_name: str):
        self.router, self.model_name = router, model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "gearshift:router_decisions", "Requests routed to a replica, by reason.", labels=["model_name", "reason"]
        )
        for reason, n in sorted(self.router.decisions.items()):
            family.add_metric([self.model_name, reason], n)
        yield family


class RayBackend:
    """Jobs go to EngineReplica through a streaming handle; Serve's router picks the replica."""

    def __init__(self, handle, info: dict, metrics: Metrics, config: ClusterConfig):
        self.handle = handle.options(stream=True)
        self.tokenizer, self.window, self.vocab_size = info["tokenizer"], info["window"], info["vocab_size"]
        self.metrics, self.config = metrics, config
        self.router = shared_router(_key(APP, "EngineReplica"), config.routing)
        self.in_flight = self.router.in_flight  # per replica; the request router reads it as the loads
        self.unplaced = 0  # accepted here, not yet by a replica
        self.capacity = config.replicas * config.slots
        metrics.waiting.labels(metrics.model_name, "router").set_function(lambda: self.unplaced)
        metrics.registry.register(_Decisions(self.router, metrics.model_name))

    def encode(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.vocab_size, prompt)

    async def start(self, job: Job) -> "RayRun":
        if sum(self.in_flight.values()) + self.unplaced >= self.capacity:
            raise queue_full()
        run = RayRun(self, job)
        await run.place()
        return run

    def placed(self, replica: str) -> None:
        if replica not in self.in_flight:  # running here: in that replica's slots or queue
            self.metrics.running.labels(self.metrics.model_name, replica).set_function(lambda: self.in_flight[replica])
        self.in_flight[replica] += 1

    def stop(self) -> None:
        pass


class RayRun:
    """One job on the cluster: placed on a replica, its events metered here as the single
    server's engine meters them (with the replica as `engine` label), and sent again when its
    replica is lost before anything reached the client."""

    def __init__(self, backend: RayBackend, job: Job):
        self.b, self.job = backend, job
        self.label = job.strategy.label
        self.extra: dict = {}
        self.replica: str | None = None
        self.gen = None
        self.aborted = False
        self.arrival = time.perf_counter()
        self.last: dict[int, float] = {}  # per choice: when its last tokens came (inter-token latency)
        self.retries = backend.config.retries

    async def place(self) -> None:
        """Send the job until a replica accepts it; a refusal is the client's error (APIError)."""
        self.b.unplaced += 1
        try:
            while True:
                gen = self.b.handle.generate.remote(self.job)
                try:
                    first = await gen.__anext__()
                except LOST as e:
                    if self.retries <= 0:
                        raise APIError(
                            503, f"no replica could take the request: {e}", type="service_unavailable"
                        ) from None
                    self.retries -= 1
                    log.warning("a replica was lost before it accepted a request; sending it again")
                    continue
                if isinstance(first, Refused):
                    raise first.error()
                self.gen, self.replica = gen, first.replica
                self.extra = {"replica": first.replica}
                self.b.placed(first.replica)
                return
        finally:
            self.b.unplaced -= 1

    def _release(self) -> None:
        if self.replica is not None:
            self.b.in_flight[self.replica] -= 1
            self.replica = None

    def _meter(self, i: int, out: StepOutput, now: float) -> None:
        m, engine = self.b.metrics, self.replica
        if out.token_ids:
            if i not in self.last:
                m.first_token(now - self.arrival, len(self.job.prompts[i // self.job.n]), engine)
                m.tokens(len(out.token_ids), None, engine)
            else:
                m.tokens(len(out.token_ids), now - self.last[i], engine)
            self.last[i] = now
        if out.completion is not None:
            m.finished(out.completion, now - self.arrival, engine)

    def _learn(self, i: int, c: Completion) -> None:
        """The replica's slot now holds the prompt and the answer: the next turn starts with both."""
        self.b.router.learn(self.job.prompts[i // self.job.n] + c.token_ids, self.replica)

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        held: list[tuple[int, StepOutput]] = []  # a non-streamed job's events, sent on once complete
        sent = False
        try:
            while True:
                try:
                    async for i, out in self.gen:
                        self._meter(i, out, time.perf_counter())
                        if out.completion is not None:
                            self._learn(i, out.completion)
                        if self.job.stream:
                            sent = True
                            yield i, out
                        else:
                            held.append((i, out))
                    break
                except LOST as e:
                    lost = self.replica
                    self._release()
                    if sent or self.aborted or self.retries <= 0:
                        raise ReplicaLost(f"replica {lost} was lost mid-stream ({type(e).__name__})") from None
                    log.warning("replica %s was lost before its request started; sending it again", lost)
                    self.retries -= 1
                    self.job = replace(self.job, avoid=self.job.avoid + (lost,))
                    held.clear()
                    self.last.clear()
                    await self.place()
            self._release()
            for item in held:
                yield item
        finally:
            self._release()

    def abort(self) -> None:
        self.aborted = True
        if self.gen is not None:
            self.gen.cancel()  # Serve cancels the replica's generator, which aborts its sequences


# ------------------------------------------------------------------ start, stop, serve

_started_ray = False


def start(config: ClusterConfig) -> str:
    """Deploy the application (starting a local Ray instance unless `ray_address` is given, or
    Ray is already initialised in this process); returns the URL once every replica is ready."""
    global _started_ray
    if config.replicas < 1:
        raise ValueError("replicas must be at least 1")
    level = getattr(logging, config.log_level.upper(), logging.WARNING)
    logging.getLogger("ray.serve").setLevel(level)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if config.ray_address:
            ray.init(address=config.ray_address, logging_level=level)
        else:
            # Ray starts its workers at nice 15, to keep its own daemons responsive; here the workers
            # are the workload, and must not lose the CPU to anything else on the machine
            os.environ.setdefault("RAY_worker_niceness", "0")
            cpus = max(os.cpu_count() or 1, config.replicas * config.threads)
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=200 * 2**20, logging_level=level)
            _started_ray = True
    serve.start(
        http_options={"host": config.host, "port": config.port}, logging_config={"log_level": config.log_level.upper()}
    )
    logging_config = {"log_level": config.log_level.upper(), "enable_access_log": False}
    replicas = EngineReplica.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.threads, "num_gpus": 1 if config.device == "cuda" else 0},
        max_ongoing_requests=config.slots,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=5,
        logging_config=logging_config,
        request_router_config=RequestRouterConfig(
            request_router_class=GearshiftRequestRouter, request_router_kwargs=asdict(config.routing)
        ),
    ).bind(config)
    front = Front.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.replicas * config.slots + 64,
        logging_config=logging_config,
    ).bind(replicas, config)
    serve.run(front, name=APP, route_prefix="/")
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def stop() -> None:
    """Remove the application; shut Serve and Ray down where `start` started Ray."""
    global _started_ray
    try:
        if _started_ray:
            serve.shutdown()
        else:
            serve.delete(APP)
    finally:
        if _started_ray:
            ray.shutdown()
            _started_ray = False


def replica_ids() -> list[str]:
    """The ids of the running EngineReplica replicas (as the `engine` label and `replica` field show them)."""
    prefix = f"SERVE_REPLICA::{APP}#EngineReplica#"
    return sorted(
        a["name"][len(prefix) :]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )


def running_replicas() -> int:
    """EngineReplica replicas Ray Serve reports RUNNING (started and past their health check; a
    replacement is listed by `replica_ids` as soon as it exists, while it still loads the model)."""
    app = serve.status().applications.get(APP)
    dep = app.deployments.get("EngineReplica") if app is not None else None
    return 0 if dep is None else sum(n for state, n in dep.replica_states.items() if str(state).endswith("RUNNING"))


def kill_replica(replica: str) -> None:
    """Kill one replica's process as a crash would (Ray Serve then starts a new one): for tests."""
    name = f"SERVE_REPLICA::{APP}#EngineReplica#{replica}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def serve_forever(config: ClusterConfig) -> None:
    """`gearshift serve --replicas`: start, print where, wait for Ctrl-C or SIGTERM, stop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `finally` runs and Ray is shut down
    try:
        url = start(config)
        where = f"the Ray cluster at {config.ray_address}" if config.ray_address else "a local Ray instance"
        print(
            f"gearshift: serving {config.server.model_name} on {url} with {config.replicas} replicas "
            f"({config.threads} threads each, {config.routing.policy} routing) on {where}",
            file=sys.stderr,
        )
        while True:
            time.sleep(3600)
    finally:
        stop()
