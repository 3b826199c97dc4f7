"""`gearshift serve` as applications reach it: a real uvicorn server on 127.0.0.1, the official
`openai` client, raw HTTP for what a client library hides (malformed JSON, headers), and the
engine's own `LLM.generate` as the reference every greedy answer must equal."""

import asyncio
import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gearshift import LLM
from gearshift.server import ServerConfig, create_app, parse_speculative_config
from gearshift.server.http import config as http_config
from gearshift.tools.llama_cpp import free_port

NAME = "smollm2"
QUESTION = [{"role": "user", "content": "Name three primary colors and say one thing about each."}]


@contextlib.contextmanager
def running(app):
    """The app under uvicorn on a free loopback port, in a thread, until the block ends."""
    port = free_port()
    server = uvicorn.Server(http_config(app, "127.0.0.1", port, log_level="warning"))  # as `gearshift serve` runs
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def serving(app):
    """`running`, then wait until the model has loaded."""
    with running(app) as url:
        wait_ready(url)
        yield url


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while httpx.get(url + "/health").status_code != 200:
        assert time.time() < deadline, "model never became ready"
        time.sleep(0.05)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped: one model per server)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            key = s.name + ("" if "finished_reason" not in s.labels else f"[{s.labels['finished_reason']}]")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def wait_idle(url: str, timeout: float = 10) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if m["gearshift:num_requests_running"] == 0 and m["gearshift:num_requests_waiting"] == 0:
            return m
        assert time.time() < deadline, f"requests left running: {m['gearshift:num_requests_running']}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(llm):
    """One server for the module: the shared weights, its own engine core (4 slots, 2048 positions)."""
    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=4, max_model_len=2048), ServerConfig(model_name=NAME))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


# ------------------------------------------------------------------ answers equal the engine's


def test_chat_equals_generate_and_reports_usage(client, llm):
    ref = llm.generate(QUESTION, max_tokens=40)
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)
    assert r.model_extra["gearshift"]["strategy"] == "plain"
    again = client.chat.completions.create(model=NAME, messages=QUESTION, max_completion_tokens=40, temperature=0)
    assert again.choices[0].message.content == ref.text
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt, from the prefix cache


def test_completion_with_logprobs_equals_generate(client, llm):
    prompt = "The capital of France is"
    ref = llm.generate(prompt, max_tokens=12, logprobs=3)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    c = r.choices[0]
    assert c.text == ref.text
    assert c.logprobs.tokens == [e.token for e in ref.logprobs]
    assert c.logprobs.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert all(len(top) == 3 for top in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0


def test_chat_logprobs_equal_generate(client, llm):
    ref = llm.generate(QUESTION, max_tokens=10, logprobs=2)
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [e.token for e in ref.logprobs]
    assert [e.logprob for e in content] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert [e.bytes for e in content] == [e.bytes for e in ref.logprobs]


def test_stream_is_openais_shape_and_equals_the_plain_answer(client, llm):
    ref = llm.generate(QUESTION, max_tokens=30)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream(client, llm):
    ref = llm.generate("Once upon a time", max_tokens=16)
    chunks = list(
        client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_n_samples_and_seed_reproducibility(client):
    args = dict(model=NAME, messages=QUESTION, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, n=2)
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(**{**args, "seed": 99})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]
    assert 2 <= a.usage.completion_tokens <= 32
    assert (
        a.usage.prompt_tokens
        == client.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=1, temperature=0
        ).usage.prompt_tokens
    )


def test_stop_strings_cut_the_answer(client, llm):
    full = llm.generate(QUESTION, max_tokens=40).text
    stop = full.split()[3]
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("method", ["ngram", "suffix", "ead+verify"])
def test_speculative_request_equals_plain(client, llm, method):
    """Per-request strategies (speculative, and EAD's lossless form) give the plain greedy answer."""
    ref = llm.generate(QUESTION, max_tokens=40)
    r = client.chat.completions.create(
        model=NAME,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        extra_body={"speculative_config": {"method": method}},
    )
    assert r.choices[0].message.content == ref.text
    report = r.model_extra["gearshift"]
    assert report["strategy"].startswith(parse_speculative_config({"method": method}).label)  # e.g. early-exit:4
    assert report["acceptance_rate"] is not None


def test_server_wide_speculative_config(llm):
    config = ServerConfig(
        model_name=NAME, speculative=parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
    )
    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=2, max_model_len=1024), config)
    ref = llm.generate(QUESTION, max_tokens=30)
    with serving(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=30, temperature=0)
        assert r.choices[0].message.content == ref.text and r.model_extra["gearshift"]["strategy"] == "lookup"
        plain = c.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            max_tokens=30,
            temperature=0,
            extra_body={"speculative_config": {"method": "none"}},
        )
        assert plain.model_extra["gearshift"]["strategy"] == "plain"
        m = metrics(url)
        assert m["gearshift:spec_decode_num_drafts_total"] > 0
        assert 0 < m["gearshift:spec_decode_num_draft_tokens_total"] <= 3 * m["gearshift:spec_decode_num_drafts_total"]


def test_second_turn_hits_the_prefix_cache_and_equals_generate(client, llm):
    turn1 = QUESTION
    a = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=30, temperature=0)
    turn2 = turn1 + [
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "Now name one secondary color."},
    ]
    b = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=30, temperature=0)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    assert b.choices[0].message.content == llm.generate(turn2, max_tokens=30).text


def test_metrics_count_what_was_served(server, client):
    before = metrics(server)
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
    )
    after = wait_idle(server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["gearshift:generation_tokens_total"] == r.usage.completion_tokens
    assert delta["gearshift:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["gearshift:prefix_cache_queries_total"] == r.usage.prompt_tokens
    assert delta["gearshift:prefix_cache_hits_total"] == r.usage.prompt_tokens_details.cached_tokens
    assert delta["gearshift:time_to_first_token_seconds_count"] == 1
    assert delta["gearshift:inter_token_latency_seconds_count"] == r.usage.completion_tokens - 1
    assert delta[f"gearshift:request_success_total[{r.choices[0].finish_reason}]"] == 1


def test_kv_policy_per_request(client, llm):
    q = [{"role": "user", "content": "The grass is green. " * 60 + "What color is the grass?"}]
    ref = llm.generate(q, max_tokens=12, kv_policy="snapkv", kv_budget=64)
    r = client.chat.completions.create(
        model=NAME, messages=q, max_tokens=12, temperature=0, extra_body={"kv_policy": "snapkv", "kv_budget": 64}
    )
    assert r.choices[0].message.content == ref.text
    report = r.model_extra["gearshift"]
    assert report["kv_bytes"] < report["kv_full_bytes"] / 3
    ref = llm.generate(q, max_tokens=12, kv_policy="snapkv+int8", kv_budget=64)  # composed with quantization
    r = client.chat.completions.create(
        model=NAME, messages=q, max_tokens=12, temperature=0, extra_body={"kv_policy": "snapkv+int8", "kv_budget": 64}
    )
    assert r.choices[0].message.content == ref.text
    assert r.model_extra["gearshift"]["kv_bytes"] < report["kv_bytes"] / 3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=q, max_tokens=2, extra_body={"kv_policy": "lru"})
    assert e.value.body["param"] == "kv_policy"


def test_tokenize_and_detokenize(server, llm):
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}).json()
    assert t["tokens"] == llm.tokenizer.encode("Hello world") and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 2048
    chat = httpx.post(server + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(QUESTION)
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"].endswith("Hello world")
    bad = httpx.post(server + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]


def test_chat_page_is_one_file_with_nothing_from_the_internet(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script src" not in r.text and "https://" not in r.text and "http://" not in r.text


# ------------------------------------------------------------------ disconnects, errors, load


def test_client_that_leaves_mid_stream_frees_its_slot(server, client):
    before = metrics(server)
    stream = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    after = wait_idle(server)
    assert (
        after["gearshift:request_success_total[abort]"] - before.get("gearshift:request_success_total[abort]", 0) == 1
    )
    assert after["gearshift:generation_tokens_total"] - before["gearshift:generation_tokens_total"] < 1500


def envelope(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param
    return err


def test_errors_come_in_openais_envelope(server, client):
    chat = server + "/v1/chat/completions"
    envelope(httpx.post(chat, content=b'{"messages": [', headers={"content-type": "application/json"}), 400, None)
    envelope(httpx.post(chat, content=b"not json at all", headers={"content-type": "application/json"}), 400)
    err = envelope(httpx.post(chat, json={"messages": QUESTION, "max_tokens": "5"}), 400, "max_tokens")
    assert "integer" in err["message"]
    envelope(httpx.post(chat, json={"messages": QUESTION, "temperature": "hot"}), 400, "temperature")
    envelope(httpx.post(chat, json={"messages": "hello"}), 400, "messages")
    envelope(httpx.post(chat, json={}), 400, "messages")
    envelope(httpx.post(chat, json={"messages": QUESTION, "tools": [{"type": "function"}]}), 400, "tools")
    envelope(
        httpx.post(chat, json={"messages": QUESTION, "speculative_config": {"method": "magic"}}),
        400,
        "speculative_config",
    )
    envelope(httpx.post(server + "/v1/completions", json={"prompt": [10**9]}), 400, "prompt")
    envelope(httpx.get(server + "/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2040)
    assert "2048" in e.value.message and "2040" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x " * 2100, max_tokens=5)
    assert "2048" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=0)
    wait_idle(server)  # nothing was left in a slot
    ok = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


def test_api_key_queue_full_and_loading(llm):
    """A small server: 1 slot, no queue, a key, and a model that loads only when told to."""
    go = threading.Event()

    def load():
        go.wait(30)
        return LLM(llm.loaded, max_num_seqs=1, max_model_len=512)

    app = create_app(load, ServerConfig(model_name=NAME, api_key="sesame", max_queue=0))
    key = {"Authorization": "Bearer sesame"}
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 5}
    with running(app) as url:
        assert httpx.get(url + "/health").status_code == 503
        envelope(httpx.post(url + "/v1/chat/completions", json=body, headers=key), 503)
        go.set()
        wait_ready(url)
        assert envelope(httpx.post(url + "/v1/chat/completions", json=body), 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in c.models.list()] == [NAME]
        stream = c.chat.completions.create(
            model=NAME, messages=QUESTION, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))  # the one slot is now taken
        full = httpx.post(url + "/v1/chat/completions", json=body, headers=key)
        assert envelope(full, 503)["code"] == "queue_full" and full.headers["retry-after"] == "1"
        stream.close()
        wait_idle(url)
        assert c.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2).usage.completion_tokens == 2


def test_bounded_load_every_request_completes_and_equals_sequential(server, llm):
    questions = [[{"role": "user", "content": f"Give one fact about the number {i}."}] for i in range(32)]
    refs = [llm.generate(q, max_tokens=24).text for q in questions]  # one at a time

    async def load():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        gate = asyncio.Semaphore(8)

        async def one(q):
            async with gate:
                if len(q[0]["content"]) % 2:  # half of them streamed
                    chunks = [
                        ch
                        async for ch in await c.chat.completions.create(
                            model=NAME, messages=q, max_tokens=24, temperature=0, stream=True
                        )
                    ]
                    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                r = await c.chat.completions.create(model=NAME, messages=q, max_tokens=24, temperature=0)
                return r.choices[0].message.content

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(q) for q in questions)), 300)
        finally:
            await c.close()

    assert asyncio.run(load()) == refs
    m = wait_idle(server)
    assert m["gearshift:num_requests_running"] == 0 and m["gearshift:num_requests_waiting"] == 0


def test_bench_serve_against_a_running_server(server, tmp_path):
    from gearshift.tools.bench_serve import run_serve

    out = tmp_path / "serve.json"
    r = run_serve(
        server, [1, 2], 2, 8, None, False, None, 4, None, json_path=str(out), plot_path=str(tmp_path / "s.png")
    )
    saved = json.loads(out.read_text())
    levels = saved["servers"][server]
    assert set(levels) == {"1", "2"} and r["servers"][server]["2"]["errors"] == 0
    for s in levels.values():
        assert s["output_tok_per_s"] > 0 and s["requests"] == 2 and 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
        assert set(s) >= {
            "requests_per_s",
            "output_tok_per_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "itl_p50_s",
            "itl_p99_s",
            "errors",
        }
    assert (tmp_path / "s.png").stat().st_size > 0
    wait_idle(server)
