"""`gearshift serve --replicas`: a real local Ray cluster (Ray Serve, 2 engine replicas of one
thread each, the front on 127.0.0.1), reached with the `openai` client and raw HTTP, against a
single `gearshift serve` on the same weights. One cluster serves the whole module (Ray takes
~15 s to start); every request is short and every wait is bounded. Skipped where Ray Serve (the
`cluster` extra) is not installed; `make test` installs it."""

import concurrent.futures as futures
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve", reason="Ray Serve (pip install 'gearshift[cluster]') is not installed")
pytestmark = pytest.mark.cluster

from gearshift import LLM  # noqa: E402
from gearshift.server import ServerConfig, create_app  # noqa: E402
from gearshift.server.routing import RoutingConfig  # noqa: E402
from gearshift.tools.llama_cpp import free_port  # noqa: E402
from test_server import serving, wait_ready  # noqa: E402

NAME = "smollm2"
ENGINE = dict(max_num_seqs=4, max_model_len=2048)
QUESTION = [{"role": "user", "content": "Name three primary colors and say one thing about each."}]


@pytest.fixture(scope="module")
def cluster(llm, gearshift_home):
    from gearshift.server import cluster

    config = cluster.ClusterConfig(
        replicas=2,
        threads=1,
        model=str(llm.loaded.path),
        engine=ENGINE,
        server=ServerConfig(model_name=NAME),
        routing=RoutingConfig(balance_abs_threshold=4),
        port=free_port(),
        home=gearshift_home,
    )
    url = cluster.start(config)
    try:
        wait_ready(url)
        yield url
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def single(llm):
    """The reference: one `gearshift serve` with the same engine settings."""
    with serving(create_app(lambda: LLM(llm.loaded, **ENGINE), ServerConfig(model_name=NAME))) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def per_engine(url: str, name: str) -> dict[str, float]:
    """One counter of /metrics by `engine` label (the replica's id; "0" on a single server)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["engine"]] = out.get(s.labels["engine"], 0.0) + s.value
    return out


def in_flight(url: str) -> dict[str, float]:
    return per_engine(url, "gearshift:num_requests_running")


# ------------------------------------------------------------------ the same API, the same answers


def test_answers_streams_and_errors_equal_a_single_servers(cluster, single):
    def answers(url: str) -> list:
        c = client(url)
        chat = c.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=24, temperature=0)
        chunks = list(
            c.chat.completions.create(
                model=NAME,
                messages=QUESTION,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0)
        text_chunks = list(
            c.completions.create(
                model=NAME, prompt=["Once upon a time", "The sky is"], max_tokens=8, temperature=0, stream=True
            )
        )
        sampled = c.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=12, temperature=1.0, seed=7, n=2)
        errors = [
            httpx.post(url + "/v1/chat/completions", json=body)
            for body in (
                {
                    "messages": QUESTION,
                    "speculative_config": {"method": "magic"},
                },  # refused by the replica's engine side
                {"messages": QUESTION, "max_tokens": 2040},  # refused at the front
                {"model": "gpt-4o", "messages": QUESTION},
            )
        ]
        streamed_text = [
            "".join(ch.choices[0].text for ch in text_chunks if ch.choices and ch.choices[0].index == i) for i in (0, 1)
        ]
        return [
            chat.choices[0].message.content,
            chat.choices[0].finish_reason,
            chat.usage.prompt_tokens,
            chat.usage.completion_tokens,
            "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
            [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1],
            chunks[-1].usage.completion_tokens,
            text.choices[0].text,
            streamed_text,
            [x.message.content for x in sampled.choices],
            [(r.status_code, {k: v for k, v in r.json()["error"].items()}) for r in errors],
            httpx.post(url + "/tokenize", json={"messages": QUESTION}).json(),
            [(m.id, m.model_extra["max_model_len"]) for m in client(url).models.list()],
        ]

    got, want = answers(cluster), answers(single)
    assert got == want
    assert got[0] and got[4] == got[0] and [e[0] for e in got[10]] == [400, 400, 404]
    report = client(cluster).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2).model_extra
    assert report["gearshift"]["replica"] in in_flight(cluster)  # which replica answered, as /metrics labels it


# ------------------------------------------------------------------ routing


def test_multi_turn_sessions_return_to_their_replica(cluster, single):
    """Three conversations of three turns, turns in rotation: each conversation stays on one
    replica, and the cluster's prefix-cache hit rate (from /metrics) is the single server's. Each
    has its own system prompt, so no two share more than the template's first tokens (with the
    model's default system prompt they would all go where it is cached)."""
    follow = ["Which one is your favourite?", "Say that again in five words."]
    sessions = [
        [
            {"role": "system", "content": f"You are assistant {name}; you answer in one sentence."},
            {"role": "user", "content": f"Tell me a short fact about the number {k}."},
        ]
        for name, k in (("Ada", 3), ("Bob", 5), ("Cy", 8))
    ]

    def run(url: str) -> tuple[list[list[str]], float, list[list[str]]]:
        c = client(url)
        hits0, queries0 = (
            per_engine(url, "gearshift:prefix_cache_hits_total"),
            per_engine(url, "gearshift:prefix_cache_queries_total"),
        )
        chats = [list(s) for s in sessions]
        replicas: list[list[str]] = [[] for _ in chats]
        texts: list[list[str]] = [[] for _ in chats]
        for turn in range(3):
            for k, chat in enumerate(chats):
                if turn:
                    chat.append({"role": "user", "content": follow[turn - 1]})
                r = c.chat.completions.create(model=NAME, messages=chat, max_tokens=20, temperature=0)
                chat.append({"role": "assistant", "content": r.choices[0].message.content})
                replicas[k].append(r.model_extra["gearshift"].get("replica", "0"))
                texts[k].append(r.choices[0].message.content)
        hits, queries = (
            per_engine(url, "gearshift:prefix_cache_hits_total"),
            per_engine(url, "gearshift:prefix_cache_queries_total"),
        )
        rate = (sum(hits.values()) - sum(hits0.values())) / (sum(queries.values()) - sum(queries0.values()))
        return replicas, rate, texts

    replicas, rate, texts = run(cluster)
    _, single_rate, single_texts = run(single)
    assert texts == single_texts
    assert all(len(set(r)) == 1 for r in replicas), replicas  # every follow-up went back to its replica
    assert len({r[0] for r in replicas}) == 2  # and new conversations were spread over both
    assert single_rate > 0.3 and rate >= 0.9 * single_rate, (rate, single_rate)


def test_bench_serve_sessions_against_the_cluster(cluster, tmp_path):
    """`gearshift bench serve --sessions --url`: multi-turn chats, hit rate and replica stickiness.
    (Before the fault test: right after a replica is replaced, a session was once seen to move.)"""
    from gearshift.tools.bench_serve import run_sessions

    r = run_sessions(
        cluster, 2, 3, 8, None, None, 4, None, [], json_path=str(tmp_path / "s.json"), plot_path=str(tmp_path / "s.png")
    )
    s = json.loads((tmp_path / "s.json").read_text())["servers"][cluster]
    assert s == r["servers"][cluster] and s["errors"] == 0 and s["turns"] == 6
    assert s["sessions_on_one_replica"] == 2 and s["follow_up_hit_rate"] > 0.5 and s["output_tok_per_s"] > 0
    assert s["ttft_first_p50_s"] > 0 and s["ttft_follow_up_p50_s"] > 0
    assert (tmp_path / "s.png").stat().st_size > 0


# ------------------------------------------------------------------ faults


def read_stream(url: str, body: dict, started=None, timeout: float = 120) -> dict:
    """A raw SSE stream: its text, whether it ended with an error event, and [DONE]."""
    out = {"text": "", "error": None, "done": False, "chunks": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out["error"] = chunk["error"]["message"]
                continue
            for choice in chunk["choices"]:
                out["text"] += choice["delta"].get("content") or ""
            out["chunks"] += 1
            if started is not None and out["text"] and not started.done():
                started.set_result(True)
    return out


def test_a_killed_replica_loses_no_request_that_had_not_started(cluster, llm):
    from gearshift.server.cluster import kill_replica, replica_ids, running_replicas

    before = replica_ids()
    assert len(before) == 2
    prompts = [[{"role": "user", "content": f"Write one sentence about the city number {i}."}] for i in range(6)]
    refs = [llm.generate(p, max_tokens=12).text for p in prompts]
    # long enough to outlive the wait below (at 400 tokens it was once over before the kill)
    long = {"model": NAME, "messages": QUESTION, "max_tokens": 1800, "temperature": 0, "ignore_eos": True}
    with futures.ThreadPoolExecutor(8) as pool:
        started: futures.Future = futures.Future()
        victim_stream = pool.submit(read_stream, cluster, long, started)
        started.result(timeout=60)  # the long stream is under way on one replica
        busy = [r for r, n in in_flight(cluster).items() if n > 0]
        assert len(busy) == 1
        victim = busy[0]
        c = client(cluster)
        short = [
            pool.submit(c.chat.completions.create, model=NAME, messages=p, max_tokens=12, temperature=0)
            for p in prompts[:4]
        ]
        streamed = [
            pool.submit(read_stream, cluster, {"model": NAME, "messages": p, "max_tokens": 12, "temperature": 0})
            for p in prompts[4:]
        ]
        deadline = time.time() + 20
        while in_flight(cluster).get(victim, 0) < 2 and time.time() < deadline:  # some land beside it
            time.sleep(0.05)
        kill_replica(victim)
        dead = victim_stream.result(timeout=90)
        assert dead["text"] and dead["error"] and "lost" in dead["error"] and dead["done"]  # ended, not hung
        for f, ref in zip(short, refs[:4]):  # not streamed: nothing had reached the client, so all are served
            assert f.result(timeout=120).choices[0].message.content == ref
        for f, ref in zip(streamed, refs[4:]):  # streamed: complete, or lost only after it had started
            s = f.result(timeout=120)
            assert s["done"] and (s["text"] == ref and s["error"] is None or s["text"] and s["error"])
    r = client(cluster).chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.model_extra["gearshift"]["replica"] != victim
    deadline = time.time() + 120  # Ray Serve replaces the dead replica (and it has loaded the model)
    while not (len(replica_ids()) == 2 and victim not in replica_ids() and running_replicas() == 2):
        assert time.time() < deadline, f"no replacement replica: {replica_ids()}"
        time.sleep(0.5)
