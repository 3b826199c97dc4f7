"""`gearshift serve` against hostile clients: every request here is one a client can send, sent to
a real server on 127.0.0.1 (the `openai` client, raw httpx, raw sockets), and each test asserts
the status, OpenAI's error envelope, and that a well-formed stream running meanwhile (the
bystander) finishes with exactly the tokens it gets alone.

One test per defect of issue 21: tiny temperatures, drafters by path, large bodies, stop lists,
integer ranges, lone surrogates, a broken model file, requests that can never fit, stalled
connections, authentication before the body; then vLLM's abort test, and a fuzzer (`make fuzz`
runs it with thousands of bodies; the default run sends a few hundred)."""

import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gearshift import LLM
from gearshift.server import ServerConfig, create_app, parse_speculative_config
from gearshift.server.protocol import MAX_STOP, MAX_STOP_CHARS
from gearshift.tools.llama_cpp import free_port
from test_server import envelope, serving, wait_idle

NAME = "smollm2"
QUESTION = [{"role": "user", "content": "Name three primary colors and say one thing about each."}]
BYSTANDER = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def served(llm):
    """One server: 4 slots, 2048 positions, and connection deadlines of 1 s (so the stalled-connection
    test takes seconds): (url, app)."""
    config = ServerConfig(model_name=NAME, timeout_headers=1.0, timeout_body=1.0)
    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=4, max_model_len=2048), config)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


_refs: dict = {}


def reference(llm, tokens: int):
    if tokens not in _refs:
        _refs[tokens] = llm.generate(BYSTANDER, max_tokens=tokens, ignore_eos=True).text
    return _refs[tokens]


@contextlib.contextmanager
def bystander(url: str, llm, tokens: int = 64, key: str = "unused"):
    """A well-formed stream, started (its first chunk read) before the block and read through it;
    afterwards its text must be exactly what it is alone."""
    expected = reference(llm, tokens)
    started, result = threading.Event(), {}

    def read():
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
            text = ""
            for chunk in c.chat.completions.create(
                model=NAME,
                messages=BYSTANDER,
                max_tokens=tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                started.set()
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            result["text"] = text
        except Exception as e:  # reported below
            result["error"] = repr(e)
        finally:
            started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert started.wait(120)
    yield
    thread.join(300)
    assert result.get("text") == expected, result.get("error", "the bystander's text changed")


def post(url: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return httpx.post(url + path, content=body, headers=headers, timeout=60, **kw)
    return httpx.post(url + path, json=body, timeout=60, **kw)


CHAT = "/v1/chat/completions"


# ------------------------------------------------------------------ 1. tiny temperatures


def test_a_tiny_temperature_is_greedy_and_ends_nobody_elses_stream(url, client, llm):
    greedy = llm.generate(QUESTION, max_tokens=16).text
    with bystander(url, llm):
        for t in (1e-40, 1e-6):
            r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=t)
            assert r.choices[0].message.content == greedy
        chunks = client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=16, temperature=1e-40, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy
    wait_idle(url)


# ------------------------------------------------------------------ 2. drafters: chosen, never loaded


def test_requests_choose_among_drafters_built_at_start_and_name_no_file(served, llm):
    url, app = served
    backend = app.state.gearshift.backend
    built = set(backend.llm._drafters)
    assert {"lookup", "suffix", "recycling", "hybrid", "early-exit", "early-exit:3"} <= built  # built at start
    gguf = str(llm.loaded.path)
    refused = [
        {"model": "/etc/shadow"},
        {"model": "/no/such/model.gguf"},
        {"model": gguf},
        {"model": "./" + gguf},
        {"method": "draft_model", "model": gguf},
        {"method": "early-exit", "num_layers": "/etc"},
        {"method": "early-exit", "num_layers": 99},
        {"method": "ead", "small": f"model:{gguf}"},
        {"method": "ead+verify", "small": "model:/etc/shadow"},
    ]
    messages = set()
    with bystander(url, llm):
        for cfg in refused:
            r = post(url, CHAT, {"messages": QUESTION, "max_tokens": 2, "speculative_config": cfg})
            err = envelope(r, 400, "speculative_config")
            assert err["code"] == "drafter_not_offered"
            messages.add(err["message"])
    assert len(messages) == 1 and "/etc" not in messages.pop()  # one answer, whatever exists on the server
    plain = llm.generate(QUESTION, max_tokens=24).text
    for cfg in (
        {"method": "early-exit", "num_layers": 3},
        {"method": "ead+verify", "small": "early-exit:3"},
        {"method": "recycling", "num_speculative_tokens": 5},
    ):  # training-free: always offered
        r = post(url, CHAT, {"messages": QUESTION, "max_tokens": 24, "temperature": 0, "speculative_config": cfg})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain, (cfg, r.text)
    assert set(backend.llm._drafters) == built  # nothing was built for a request
    wait_idle(url)


def test_a_draft_model_the_operator_offers_is_loaded_at_start_and_chosen_by_its_exact_name(llm):
    gguf = str(llm.loaded.path)  # the model as its own draft: any model sharing the tokenizer would do
    config = ServerConfig(model_name=NAME, offered=[parse_speculative_config({"model": gguf})])
    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=2, max_model_len=1024), config)
    plain = llm.generate(QUESTION, max_tokens=24).text
    with serving(app) as url:
        r = post(
            url,
            CHAT,
            {
                "messages": QUESTION,
                "max_tokens": 24,
                "temperature": 0,
                "speculative_config": {"model": gguf, "num_speculative_tokens": 3},
            },
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain
        assert r.json()["gearshift"]["strategy"] == f"model:{gguf}"
        envelope(
            post(url, CHAT, {"messages": QUESTION, "speculative_config": {"model": "./" + gguf}}),
            400,
            "speculative_config",
        )
        default = post(url, CHAT, {"messages": QUESTION, "max_tokens": 4})
        assert default.json()["gearshift"]["strategy"] == "plain"  # offered is not the default: the first is


# ------------------------------------------------------------------ 3. large bodies, long prompts


def test_bodies_over_the_limit_get_413_and_long_prompts_are_refused_before_tokenizing(served, llm):
    url, app = served
    limit = app.state.gearshift.config.max_body_bytes
    window = 2048
    with bystander(url, llm, tokens=96):
        big = {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}
        err = envelope(post(url, CHAT, big), 413, None)
        assert err["code"] == "request_too_large" and str(limit) in err["message"]
        chunks = (b" " * 65536 for _ in range(limit // 65536 + 2))  # no Content-Length: counted as it arrives
        envelope(
            httpx.post(
                url + "/v1/completions", content=chunks, headers={"content-type": "application/json"}, timeout=60
            ),
            413,
        )
        # under the body limit, but more characters than 2048 tokens can hold: refused without tokenizing
        chars = 2 * window * llm.tokenizer.longest_piece + 1
        err = envelope(post(url, "/v1/completions", {"prompt": "x" * chars, "max_tokens": 1}), 400, "prompt")
        assert err["code"] == "context_length_exceeded" and "characters" in err["message"]
        # few enough characters, too many tokens: refused after tokenizing (in a worker thread)
        err = envelope(post(url, CHAT, {"messages": [{"role": "user", "content": "hello " * 3000}]}), 400, "messages")
        assert err["code"] == "context_length_exceeded"
    wait_idle(url)


# ------------------------------------------------------------------ 4. stop lists


def test_stop_lists_are_bounded(url, client, llm):
    with bystander(url, llm):
        err = envelope(
            post(url, CHAT, {"messages": QUESTION, "stop": [f"s{i}" for i in range(MAX_STOP + 1)]}), 400, "stop"
        )
        assert str(MAX_STOP) in err["message"]
        envelope(post(url, CHAT, {"messages": QUESTION, "stop": "z" * (MAX_STOP_CHARS + 1)}), 400, "stop")
        envelope(post(url, CHAT, {"messages": QUESTION, "stop": ["ok", "z" * (MAX_STOP_CHARS + 1)]}), 400, "stop")
        envelope(post(url, CHAT, {"messages": QUESTION, "stop": ["ok", ""]}), 400, "stop")
        r = client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            stop=[chr(0x2600 + i) * MAX_STOP_CHARS for i in range(MAX_STOP)],
        )
        assert r.choices[0].message.content == llm.generate(QUESTION, max_tokens=8).text
    wait_idle(url)


# ------------------------------------------------------------------ 5. integer (and float) ranges


@pytest.mark.parametrize(
    "field,value,path",
    [
        ("seed", 2**64, CHAT),
        ("seed", -(2**63) - 1, CHAT),
        ("max_tokens", 2**40, CHAT),
        ("top_k", 2**70, CHAT),
        ("kv_budget", 2**70, CHAT),
        ("n", 10**30, CHAT),
        ("max_completion_tokens", 2**64, CHAT),
        ("top_logprobs", 10**20, CHAT),
        ("logprobs", 2**64, "/v1/completions"),
        ("best_of", 2**64, "/v1/completions"),
    ],
)
def test_integers_out_of_range_are_400s(url, field, value, path):
    body = {"messages": QUESTION} if path == CHAT else {"prompt": "Hello"}
    for stream in (False, True):  # streamed, the refusal is still a 400, not an error inside a 200
        envelope(post(url, path, {**body, field: value, "stream": stream}), 400, field)


def test_ranges_the_server_accepts_and_the_rest_it_refuses(url, client, llm):
    with bystander(url, llm):
        for seed in (-(2**63), 2**63 - 1):  # int64's ends; with n = 2 the second sample is seeded seed + 1
            r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, seed=seed, n=2)
            assert len(r.choices) == 2
        spec = [
            {"method": "ead", "window": 10**30},
            {"method": "ead", "tau": "hot"},
            {"method": "ead", "min_run": 0},
            {"method": "ngram", "num_speculative_tokens": 2**70},
            {"method": "early-exit", "num_layers": 1.5},
        ]
        for cfg in spec:
            envelope(post(url, CHAT, {"messages": QUESTION, "speculative_config": cfg}), 400, "speculative_config")
        for raw in (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        ):
            envelope(post(url, CHAT, raw), 400)
    wait_idle(url)


# ------------------------------------------------------------------ 6. lone surrogates


def test_lone_surrogates_are_400s_in_the_envelope(url, llm):
    bodies = [
        (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("/v1/completions", b'{"prompt": "\\udfff"}'),
        ("/v1/completions", b'{"prompt": ["ok", "\\ud800"]}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
        (CHAT, b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ]  # a surrogate as raw bytes
    with bystander(url, llm):
        for path, raw in bodies:
            r = post(url, path, raw)
            assert r.headers["content-type"] == "application/json", r.text
            envelope(r, 400)
    wait_idle(url)


# ------------------------------------------------------------------ 7. a model that cannot load


def test_serve_exits_non_zero_with_one_line_when_the_model_cannot_load(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    proc = subprocess.run(
        [sys.executable, "-m", "gearshift", "serve", str(broken), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gearshift: error: the model could not be loaded"), proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ 8, 10: never-fit requests; keys first


@pytest.fixture(scope="module")
def small(llm):
    """2 slots, 1 waiting place, an API key, a cap of 20 connections whose headers may take 30 s."""
    config = ServerConfig(model_name=NAME, api_key="sesame", max_queue=1, max_connections=20, timeout_headers=30)
    with serving(create_app(lambda: LLM(llm.loaded, max_num_seqs=2, max_model_len=1024), config)) as url:
        yield url


KEY = {"Authorization": "Bearer sesame"}


def test_a_request_that_can_never_fit_is_a_400_not_a_retry_later(small, llm):
    with bystander(small, llm, key="sesame"):
        err = envelope(post(small, CHAT, {"messages": QUESTION, "n": 4, "max_tokens": 2}, headers=KEY), 400, "n")
        assert err["code"] == "request_too_large" and "2 running and 1 waiting" in err["message"]
        envelope(post(small, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2}, headers=KEY), 400, "n")
    r = post(small, CHAT, {"messages": QUESTION, "n": 3, "max_tokens": 2}, headers=KEY)  # 2 running, 1 waiting
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_the_api_key_is_checked_before_the_body_is_read(small):
    for path in (CHAT, "/v1/completions", "/tokenize", "/detokenize"):
        for body in (b'{"messages": 5', b'{"max_tokens": "x"}', b"x" * (3 * 1024 * 1024)):
            r = post(small, path, body)
            assert envelope(r, 401)["code"] == "invalid_api_key", (path, r.text)
            assert envelope(post(small, path, body, headers={"Authorization": "Bearer nope"}), 401)
    assert envelope(post(small, CHAT, b'{"messages": 5}', headers=KEY), 400)["param"] == "messages"
    assert post(small, CHAT, b"x" * (3 * 1024 * 1024), headers=KEY).status_code == 413


# ------------------------------------------------------------------ 9. stalled connections


def closed(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_stalled_connections_are_closed_and_the_connection_count_is_capped(url, small, llm):
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    socks, stop = [], threading.Event()
    for i in range(250):
        s = socket.create_connection((host, int(port)))
        if i % 5 == 0:
            pass  # sends nothing at all
        elif i % 5 in (1, 2):
            s.sendall(head)  # stops mid-headers
        else:
            s.sendall(head + b"content-length: 1000\r\n\r\n" + b'{"messages": [')  # stops mid-body
        socks.append(s)
    slow = [socket.create_connection((host, int(port))) for _ in range(5)]

    def drip():  # slowloris: one header byte every 0.2 s never extends the deadline
        line = b"X-Slow: " + b"a" * 1000
        for i in range(len(line)):
            if stop.is_set():
                return
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(line[i : i + 1])
            time.sleep(0.2)

    threading.Thread(target=drip, daemon=True).start()
    with bystander(url, llm, tokens=160):
        deadline = time.time() + 20
        while not all(closed(s) for s in socks + slow):
            assert time.time() < deadline, f"{sum(not closed(s) for s in socks + slow)} stalled sockets still open"
            time.sleep(0.2)
    stop.set()
    for s in socks + slow:
        s.close()
    # the cap: 20 connections held open (their headers may take 30 s), the 21st is closed at once
    host, port = small.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(20)]
    time.sleep(0.3)
    extra = socket.create_connection((host, int(port)))
    extra.settimeout(5)
    assert extra.recv(10) == b"" and not any(closed(s) for s in held)
    for s in held + [extra]:
        s.close()
    time.sleep(0.3)
    assert post(small, CHAT, {"messages": QUESTION, "max_tokens": 2}, headers=KEY).status_code == 200


def test_headers_too_large_get_431(url):
    r = httpx.get(url + "/health", headers={"X-Big": "a" * 100_000}, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


# ------------------------------------------------------------------ vLLM's abort test, ported


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_aborted_requests_leave_the_others_identical_and_nothing_behind(url, llm):
    """100 requests at once, 10 of them aborted at random points (streams left after k chunks,
    plain requests whose client gives up after a random wait); the other 90 equal their solo
    outputs; the gauges come back to 0; memory after three rounds stays within 10% of the first."""
    questions = [[{"role": "user", "content": f"Give one fact about the number {i}."}] for i in range(20)]
    refs = [llm.generate(q, max_tokens=24).text for q in questions]

    async def one_round(seed: int):
        rng = random.Random(seed)
        aborted = set(rng.sample(range(100), 10))
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

        async def one(i: int):
            q = questions[i % 20]
            if i in aborted and i % 2:
                stream = await c.chat.completions.create(
                    model=NAME, messages=q, max_tokens=24, temperature=0, stream=True
                )
                k, n = rng.randrange(0, 8), 0
                async for _ in stream:
                    n += 1
                    if n > k:
                        break
                await stream.close()
                return None
            call = c.chat.completions.create(model=NAME, messages=q, max_tokens=24, temperature=0)
            if i in aborted:
                with contextlib.suppress(asyncio.TimeoutError, openai.APITimeoutError):
                    await asyncio.wait_for(call, rng.uniform(0.05, 3.0))
                return None
            return (await call).choices[0].message.content

        try:
            return await asyncio.gather(*(one(i) for i in range(100))), aborted
        finally:
            await c.close()

    rss = []
    for round_no in range(3):
        results, aborted = asyncio.run(one_round(round_no))
        assert [r for i, r in enumerate(results) if i not in aborted] == [
            refs[i % 20] for i in range(100) if i not in aborted
        ]
        m = wait_idle(url, timeout=30)
        assert m["gearshift:kv_cache_entries"] == 0 and m["gearshift:kv_cache_bytes"] == 0
        rss.append(rss_bytes())
    assert rss[2] <= 1.10 * rss[0], rss


# ------------------------------------------------------------------ the fuzzer

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def either(plausible):
    return st.one_of(plausible, plausible, plausible, junk)


text = st.text(max_size=40)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"]),
        "content": either(
            st.one_of(
                text,
                st.lists(
                    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=2
                ),
            )
        ),
    }
)
COMMON = {
    "model": either(st.sampled_from([NAME, "gpt-4o", ""])),
    "max_tokens": either(st.integers(-2, 40) | st.integers()),
    "temperature": either(st.floats(-1, 3) | st.sampled_from([0, 1e-40, 1e-5, 2])),
    "top_p": either(st.floats(-0.5, 1.5)),
    "top_k": either(st.integers(-3, 100)),
    "seed": either(st.integers()),
    "n": either(st.integers(-1, 20)),
    "stop": either(st.one_of(text, st.lists(st.text(max_size=300), max_size=20))),
    "stream": either(st.booleans()),
    "stream_options": either(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": either(st.booleans()),
    "speculative_config": either(
        st.fixed_dictionaries(
            {},
            optional={
                "method": st.sampled_from(
                    [
                        "ngram",
                        "suffix",
                        "recycling",
                        "hybrid",
                        "early-exit",
                        "ead",
                        "ead+verify",
                        "none",
                        "draft_model",
                        "magic",
                    ]
                ),
                "model": st.sampled_from(["/etc/passwd", "x", ""]),
                "num_speculative_tokens": st.integers(-1, 70),
                "num_layers": st.integers(-1, 40) | st.text(max_size=5),
                "tau": st.floats(-1, 10),
                "small": st.sampled_from(["early-exit", "early-exit:2", "model:/etc/passwd", "lookup"]),
                "window": st.integers(0, 10),
                "min_run": st.integers(0, 10),
            },
        )
    ),
    "kv_policy": either(
        st.sampled_from(["snapkv", "streaming", "h2o", "pyramid", "duo", "int8", "int4", "snapkv+int4", "lru", ""])
    ),
    "kv_budget": either(st.integers(-1, 300)),
    "presence_penalty": either(st.floats(-2, 2)),
    "logit_bias": either(st.dictionaries(text, st.integers())),
}
CHAT_BODY = st.fixed_dictionaries(
    {},
    optional={
        **COMMON,
        "messages": either(st.lists(message, max_size=3)),
        "logprobs": either(st.booleans()),
        "top_logprobs": either(st.integers(-1, 25)),
        "max_completion_tokens": either(st.integers(-1, 40)),
        "tools": either(st.lists(junk, max_size=1)),
        "response_format": either(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    },
)
COMPLETION_BODY = st.fixed_dictionaries(
    {},
    optional={
        **COMMON,
        "prompt": either(
            st.one_of(
                text,
                st.lists(st.integers(-5, 50000), max_size=12),
                st.lists(text, max_size=3),
                st.lists(st.lists(st.integers(-1, 50000), max_size=5), max_size=3),
            )
        ),
        "logprobs": either(st.integers(-1, 25)),
        "echo": either(st.booleans()),
        "best_of": either(st.integers(-1, 5)),
    },
)
REQUEST = st.one_of(
    st.tuples(st.just(CHAT), CHAT_BODY),
    st.tuples(st.just("/v1/completions"), COMPLETION_BODY),
    st.tuples(
        st.just("/tokenize"),
        st.fixed_dictionaries(
            {},
            optional={
                "prompt": either(text),
                "messages": either(st.lists(message, max_size=2)),
                "add_special_tokens": either(st.booleans()),
            },
        ),
    ),
    st.tuples(
        st.just("/detokenize"),
        st.fixed_dictionaries({}, optional={"tokens": either(st.lists(st.integers(-2, 60000), max_size=8))}),
    ),
)
# and bodies every field of which is in range, in any combination (speculation with KV policies,
# logprobs, n, streams, stop strings): they run, and must run without a server error
word = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
VALID_COMMON = {
    "max_tokens": st.integers(1, 24),
    "temperature": st.sampled_from([0, 1e-30, 0.5, 1.0, 2.0]),
    "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.integers(1, 3),
    "stop": st.lists(word, max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "speculative_config": st.sampled_from(
        [{"method": m} for m in ("ngram", "suffix", "recycling", "hybrid", "early-exit", "ead", "ead+verify", "none")]
        + [{"method": "early-exit", "num_layers": 2, "num_speculative_tokens": 2}]
    ),
    "kv_policy": st.sampled_from(["snapkv", "streaming", "h2o", "pyramid", "int8", "int4", "snapkv+int8"]),
    "kv_budget": st.integers(40, 96),
}
VALID = st.one_of(
    st.tuples(
        st.just(CHAT),
        st.fixed_dictionaries(
            {
                "messages": st.lists(
                    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": word}),
                    min_size=1,
                    max_size=2,
                )
            },
            optional={**VALID_COMMON, "logprobs": st.just(True), "top_logprobs": st.integers(0, 5)},
        ),
    ),
    st.tuples(
        st.just("/v1/completions"),
        st.fixed_dictionaries(
            {"prompt": st.one_of(word, st.lists(st.integers(0, 49151), min_size=1, max_size=12))},
            optional={**VALID_COMMON, "logprobs": st.integers(0, 5)},
        ),
    ),
)
FUZZ = int(os.environ.get("GEARSHIFT_FUZZ", "160"))  # bodies; `make fuzz` sends 3,000
STATUS: collections.Counter = collections.Counter()  # what the fuzzed bodies got, printed at the end


def check(r: httpx.Response, stream: bool) -> None:
    STATUS[r.status_code] += 1
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    elif stream and r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1]), r.text


@pytest.fixture(scope="module")
def fuzzed(llm):
    """A server whose slots hold 96 positions: any accepted body generates a few dozen tokens at most."""
    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=8, max_model_len=96), ServerConfig(model_name=NAME))
    with serving(app) as url:
        yield url


@settings(
    max_examples=max(1, FUZZ // 8),
    deadline=None,
    derandomize="GEARSHIFT_FUZZ" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(st.one_of(REQUEST, VALID), min_size=8, max_size=8))
def test_fuzzed_bodies_get_no_5xx_and_every_4xx_in_the_envelope(fuzzed, batch):
    """Eight bodies at a time, sent concurrently: OpenAI-shaped ones with values in and out of range,
    junk in every field."""

    def send(item):
        path, body = item
        raw = json.dumps(body).encode()  # (NaN and infinities as Python writes them: not JSON, but sent)
        r = httpx.post(fuzzed + path, content=raw, headers={"content-type": "application/json"}, timeout=300)
        check(r, isinstance(body, dict) and body.get("stream") is True)

    with ThreadPoolExecutor(len(batch)) as pool:
        list(pool.map(send, batch))  # (re-raises the first failed check)


def test_the_fuzzed_server_is_healthy_afterwards(fuzzed, llm, capsys):
    with capsys.disabled():
        print(f"\nfuzzed bodies by status: {dict(sorted(STATUS.items()))}")
    assert httpx.get(fuzzed + "/health").json() == {"status": "ok"}
    m = wait_idle(fuzzed, timeout=60)
    assert m["gearshift:kv_cache_entries"] == 0
    q = [{"role": "user", "content": "Hi!"}]
    r = post(fuzzed, CHAT, {"messages": q, "max_tokens": 12, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == llm.generate(q, max_tokens=12).text
