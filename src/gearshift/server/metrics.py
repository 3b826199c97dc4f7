"""Prometheus metrics, named as vLLM names them (`vllm:x` is `gearshift:x` here, as SGLang's are
`sglang:x`), so a dashboard written for vLLM needs only its prefix changed.

Each app has its own registry (several servers in one process, as in the tests, do not collide).
Counters are fed by the engine thread as outputs and completions arrive; the running and waiting
gauges read the engine when scraped. Every sample carries an `engine` label, as vLLM's data-parallel
engines do: "0" for `gearshift serve`, the Ray Serve replica's id behind `gearshift serve
--replicas` (there the front counts what each replica streams back, so per-replica prefix-cache
hit rates are `prefix_cache_hits / prefix_cache_queries` by label; see `cluster.py` for the gauges).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..sequence import Completion

P = "gearshift:"
_LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name", "engine"]
        self.model_name = model_name
        self.running = Gauge(
            P + "num_requests_running", "Requests in KV cache slots, decoding or prefilling.", label, registry=r
        )
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting for a slot.", label, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", label, registry=r)
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Time to first token.", label, buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Time between successive output steps (a speculative step can bring several tokens).",
            label,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "Arrival to last token.", label, buckets=_LATENCY, registry=r
        )
        self.success = Counter(
            P + "request_success", "Finished requests, by finish reason.", label + ["finished_reason"], registry=r
        )
        self.drafts = Counter(P + "spec_decode_num_drafts", "Speculative steps that scored a draft.", label, registry=r)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "Draft tokens proposed.", label, registry=r)
        self.accepted_tokens = Counter(
            P + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", label, registry=r
        )
        self.prefix_queries = Counter(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", label, registry=r
        )
        self.prefix_hits = Counter(
            P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", label, registry=r
        )

        self.kv_entries = Gauge(
            P + "kv_cache_entries",
            "KV cache entries held by running sequences (every layer and KV head; a KV policy keeps fewer).",
            label,
            registry=r,
        )
        self.kv_bytes = Gauge(P + "kv_cache_bytes", "Bytes those entries take.", label, registry=r)
        self.kv_dropped = Counter(
            P + "kv_cache_dropped_bytes",
            "Bytes of entries KV policies dropped, by the end of each request.",
            label,
            registry=r,
        )

    def watch(
        self,
        running: Callable[[], int],
        waiting: Callable[[], int],
        kv: Callable[[], tuple[int, int]] | None = None,
        engine: str = "0",
    ) -> None:
        self.running.labels(self.model_name, engine).set_function(running)
        self.waiting.labels(self.model_name, engine).set_function(waiting)
        if kv is not None:
            self.kv_entries.labels(self.model_name, engine).set_function(lambda: kv()[0])
            self.kv_bytes.labels(self.model_name, engine).set_function(lambda: kv()[1])

    def first_token(self, seconds: float, prompt_tokens: int, engine: str = "0") -> None:
        self.ttft.labels(self.model_name, engine).observe(seconds)
        self.prompt_tokens.labels(self.model_name, engine).inc(prompt_tokens)

    def tokens(self, n: int, gap_s: float | None, engine: str = "0") -> None:
        self.generation_tokens.labels(self.model_name, engine).inc(n)
        if gap_s is not None:
            self.itl.labels(self.model_name, engine).observe(gap_s)

    def finished(self, c: Completion, e2e_s: float, engine: str = "0") -> None:
        name, st = self.model_name, c.stats
        self.e2e.labels(name, engine).observe(e2e_s)
        self.success.labels(name, engine, c.finish_reason).inc()
        if st is not None and st.spec is not None:
            self.drafts.labels(name, engine).inc(st.spec.drafts)
            self.draft_tokens.labels(name, engine).inc(st.spec.proposed)
            self.accepted_tokens.labels(name, engine).inc(st.spec.accepted)
        self.prefix_queries.labels(name, engine).inc(c.prompt_tokens)
        self.prefix_hits.labels(name, engine).inc(c.cached_tokens)
        if st is not None:
            self.kv_dropped.labels(name, engine).inc(max(0, st.kv_full_bytes - st.kv_bytes))

    def text(self) -> bytes:
        return generate_latest(self.registry)
