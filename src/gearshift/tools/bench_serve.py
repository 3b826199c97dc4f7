"""`gearshift bench serve`: load on any OpenAI-compatible server, and gearshift beside llama-server.

An async client (httpx) keeps `c` streaming chat requests in flight (each worker sends its next
Spec-Bench question when the last one ends) and times every server-sent event: time to first
content, the gaps between content events (inter-token latency, as vLLM's benchmark measures it;
a speculative step that brings several tokens is one event), tokens from the usage chunk.
Per concurrency level: requests/s, output tokens/s, TTFT and ITL p50/p99, errors.

`--url` measures a running server. `--compare-llama-cpp` starts `gearshift serve` and llama.cpp's
`llama-server` (`-np` = `--max-num-seqs`, continuous batching, the same GGUF file and threads)
on loopback in turn, runs the same load on each, and stops them. Every request asks for the same
number of tokens (`ignore_eos`, which both servers honour), so both servers do the same work.

`--sessions S` runs multi-turn chats instead (`run_sessions`): S conversations at once, each
sending its next turn (with the answers so far) when the last one ends; turns 1-2 are Spec-Bench's
MT-bench questions, later ones follow-ups from a fixed list, greedy, so every server is asked
exactly the same. Per server: the prefix-cache hit rate (cached / prompt tokens, from each
response's usage), time to first token of first and follow-up turns, output tokens/s, and on a
cluster how many conversations stayed on one replica. With `--replicas N` it starts `gearshift
serve --replicas N` once per `--routing` policy (threads split across the replicas) and a single
`gearshift serve` with the same total threads, in turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ..errors import GearshiftError
from . import llama_cpp
from .bench import _emit
from .bench_engine import FOLLOW_UPS, _percentile
from .data import spec_bench_questions


async def _one(client, url: str, body: dict, headers: dict) -> dict:
    """One streamed chat request: its TTFT, inter-event gaps, output tokens and error (if any)."""
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    pieces, tokens, error = 0, None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return {"error": f"HTTP {r.status_code}: {text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    error = str(chunk["error"].get("message", chunk["error"]))
                    break
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last, pieces = now, pieces + 1
    except Exception as e:  # a broken connection is a failed request, counted, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    if error is None and first is None:
        error = "no content"
    return {
        "error": error,
        "ttft": (first or t0) - t0,
        "gaps": gaps,
        "tokens": tokens if tokens is not None else pieces,
        "e2e": time.perf_counter() - t0,
    }


async def _level(url: str, bodies: list[dict], concurrency: int, api_key: str | None, bar) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[dict] = []

    async def worker(client):
        while not queue.empty():
            body = queue.get_nowait()
            results.append(await _one(client, url, body, headers))
            bar.update(1)

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if not r.get("error")]
    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok]
    errors = [r["error"] for r in results if r.get("error")]
    return {
        "requests": len(results),
        "requests_per_s": len(ok) / wall,
        "output_tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p99_s": _percentile(ttfts, 99),
        "itl_p50_s": _percentile(gaps, 50),
        "itl_p99_s": _percentile(gaps, 99),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
    }


def _bodies(n: int, max_tokens: int, model: str | None, start: int = 0) -> list[dict]:
    """Requests for Spec-Bench questions start, start + 1, ...: each level asks new questions, so
    no level's prompts are in a cache from the level before."""
    questions = spec_bench_questions()
    out = []
    for i in range(start, start + n):
        q = questions[i % len(questions)]
        body = {
            "messages": [{"role": "user", "content": q["turns"][0]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if model:
            body["model"] = model
        out.append(body)
    return out


def _model_of(url: str, api_key: str | None) -> str | None:
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def measure(
    url: str,
    levels: list[int],
    n_requests: int | None,
    max_tokens: int,
    api_key: str | None = None,
    label: str = "server",
) -> dict[str, dict]:
    """The load at each concurrency level against one server: {str(c): summary}."""
    from tqdm import tqdm

    model = _model_of(url, api_key)
    asyncio.run(_level(url, _bodies(1, 8, model, start=-1), 1, api_key, _NoBar()))  # warm-up: not counted
    out, start = {}, 0
    for c in levels:
        n = n_requests or max(8, 2 * c)
        with tqdm(total=n, desc=f"{label} c={c}", leave=False, file=sys.stderr) as bar:
            out[str(c)] = asyncio.run(_level(url, _bodies(n, max_tokens, model, start), c, api_key, bar))
        start += n
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextmanager
def gearshift_server(model: str | None, max_num_seqs: int, threads: int, extra: list[str] | None = None):
    """`gearshift serve` in a subprocess on a free loopback port, until the block ends."""
    port = llama_cpp.free_port()
    cmd = [
        sys.executable,
        "-m",
        "gearshift",
        "serve",
        *([model] if model else []),
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *(extra or []),
    ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise GearshiftError("gearshift serve exited: " + log.read().decode(errors="replace").strip()[-300:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise GearshiftError("gearshift serve did not become ready in 300 s")
            time.sleep(0.3)
        yield url, cmd
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_serve(
    url: str | None,
    levels: list[int],
    n_requests: int | None,
    max_tokens: int,
    api_key: str | None,
    compare_llama_cpp: bool,
    model: str | None,
    max_num_seqs: int,
    llama_prefix: str | None,
    threads: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
) -> dict:
    threads = threads or max(1, os.cpu_count() or 1)
    result: dict = {"levels": levels, "max_tokens": max_tokens, "servers": {}, "commands": {}}
    if url:
        result["servers"][url] = measure(url.rstrip("/"), levels, n_requests, max_tokens, api_key, url)
    if compare_llama_cpp:
        from .. import hub

        path = hub.resolve_model(model)
        if path.is_dir() or path.suffix != ".gguf":
            raise GearshiftError("--compare-llama-cpp needs a GGUF model file (llama-server reads only GGUF)")
        result.update(model=str(path), threads=threads, max_num_seqs=max_num_seqs)
        with gearshift_server(str(path), max_num_seqs, threads) as (gs_url, cmd):
            result["commands"]["gearshift"] = " ".join(cmd)
            result["servers"]["gearshift"] = measure(gs_url, levels, n_requests, max_tokens, None, "gearshift")
        with llama_cpp.Server(
            path, threads, slots=max_num_seqs, ctx=2048, prefix=llama_prefix, extra=["--cont-batching"]
        ) as srv:
            result["commands"]["llama.cpp"] = " ".join(srv.cmd)
            result["servers"]["llama.cpp"] = measure(srv.url, levels, n_requests, max_tokens, None, "llama.cpp")
        g, lc = result["servers"]["gearshift"], result["servers"]["llama.cpp"]
        result["ratio_vs_llama_cpp"] = {
            c: {
                "output_tok_per_s": g[c]["output_tok_per_s"] / lc[c]["output_tok_per_s"]
                if lc[c]["output_tok_per_s"]
                else None,
                "ttft_p99": g[c]["ttft_p99_s"] / lc[c]["ttft_p99_s"] if lc[c]["ttft_p99_s"] else None,
            }
            for c in g
        }
    if not result["servers"]:
        raise GearshiftError("bench serve needs --url URL or --compare-llama-cpp")
    return _emit(result, print_serve, plot_serve, json_path, plot_path)


def print_serve(r: dict) -> None:
    print(
        f"{'server':<26} {'c':>3} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}"
    )
    for name, levels in r["servers"].items():
        for c, s in levels.items():
            print(
                f"{name[:26]:<26} {c:>3} {s['requests_per_s']:>6.2f} {s['output_tok_per_s']:>9.1f} "
                f"{s['ttft_p50_s']:>8.2f}s {s['ttft_p99_s']:>8.2f}s {1000 * s['itl_p50_s']:>6.0f}ms "
                f"{1000 * s['itl_p99_s']:>6.0f}ms {s['errors']:>6}"
            )
    for c, ratio in (r.get("ratio_vs_llama_cpp") or {}).items():
        if ratio["output_tok_per_s"] is not None:
            print(
                f"c={c}: gearshift / llama.cpp output tok/s {ratio['output_tok_per_s']:.2f}x, "
                f"TTFT p99 {ratio['ttft_p99']:.2f}x"
            )


def plot_serve(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in r["servers"].items():
        cs = [int(c) for c in levels]
        a.plot(cs, [levels[str(c)]["output_tok_per_s"] for c in cs], marker="o", label=name)
        b.plot(cs, [levels[str(c)]["ttft_p99_s"] for c in cs], marker="o", label=name)
    a.set(xlabel="concurrent requests", ylabel="output tokens/s", title="throughput")
    b.set(xlabel="concurrent requests", ylabel="seconds", title="TTFT p99")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ multi-turn sessions (replicas and routing)


def _sessions(n_sessions: int, n_turns: int) -> list[list[str]]:
    """The user turns of each conversation: two Spec-Bench MT-bench turns, then fixed follow-ups."""
    import random

    mt = [q for q in spec_bench_questions() if len(q.get("turns", [])) >= 2]
    if len(mt) < n_sessions:
        raise GearshiftError(f"only {len(mt)} two-turn questions in the Spec-Bench data for {n_sessions} sessions")
    rng = random.Random(0)
    return [
        q["turns"][: min(2, n_turns)] + [rng.choice(FOLLOW_UPS) for _ in range(n_turns - 2)] for q in mt[:n_sessions]
    ]


async def _turn(client, url: str, body: dict, headers: dict) -> dict:
    """One streamed chat turn: its text (the next turn's history), TTFT, usage and replica."""
    t0 = time.perf_counter()
    out = {"text": "", "ttft": None, "tokens": 0, "prompt": 0, "cached": 0, "replica": None, "error": None}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line[6:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    out["error"] = str(chunk["error"].get("message", chunk["error"]))
                    break
                if chunk.get("usage"):
                    u = chunk["usage"]
                    out.update(
                        tokens=u.get("completion_tokens", 0),
                        prompt=u.get("prompt_tokens", 0),
                        cached=(u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                    )
                if (chunk.get("gearshift") or {}).get("replica"):
                    out["replica"] = chunk["gearshift"]["replica"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        out["ttft"] = out["ttft"] if out["ttft"] is not None else time.perf_counter() - t0
                        out["text"] += choice["delta"]["content"]
    except Exception as e:  # a broken connection is a failed turn, counted, not a crash
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def _run_sessions(
    url: str, sessions: list[list[str]], max_tokens: int, model: str | None, api_key: str | None, bar
) -> tuple[list[list[dict]], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(users: list[str], client) -> list[dict]:
        messages, turns = [], []
        for text in users:
            messages.append({"role": "user", "content": text})
            body = {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **({"model": model} if model else {}),
            }
            turn = await _turn(client, url, body, headers)
            turns.append(turn)
            bar.update(1)
            if turn["error"]:
                break
            messages.append({"role": "assistant", "content": turn["text"]})
        return turns

    limits = httpx.Limits(max_connections=len(sessions) + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(users, client) for users in sessions))
        return list(results), time.perf_counter() - t0


def measure_sessions(
    url: str, sessions: list[list[str]], max_tokens: int, api_key: str | None = None, label: str = "server"
) -> dict:
    """The multi-turn load on one server: hit rate, TTFT by turn kind, throughput."""
    from tqdm import tqdm

    model = _model_of(url, api_key)
    asyncio.run(_level(url, _bodies(1, 8, model, start=-1), 1, api_key, _NoBar()))  # warm-up: not counted
    load = os.getloadavg()[0]  # in the JSON: was anything else running? (includes this server's own start)
    with tqdm(total=sum(map(len, sessions)), desc=f"{label}", leave=False, file=sys.stderr) as bar:
        results, wall = asyncio.run(_run_sessions(url, sessions, max_tokens, model, api_key, bar))
    turns = [t for s in results for t in s]
    ok = [t for t in turns if not t["error"]]
    first = [s[0] for s in results if s and not s[0]["error"]]
    follow = [t for s in results for t in s[1:] if not t["error"]]

    def rate(ts: list[dict]) -> float | None:
        prompt = sum(t["prompt"] for t in ts)
        return sum(t["cached"] for t in ts) / prompt if prompt else None

    def ttfts(ts: list[dict]) -> list[float]:
        return [t["ttft"] for t in ts if t["ttft"] is not None]

    replicas = [{t["replica"] for t in s if t["replica"]} for s in results]
    errors = [t["error"] for t in turns if t["error"]]
    return {
        "sessions": len(sessions),
        "turns": len(turns),
        "errors": len(errors),
        "load_average_before": load,
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "hit_rate": rate(ok),
        "follow_up_hit_rate": rate(follow),
        "ttft_first_p50_s": _percentile(ttfts(first), 50),
        "ttft_follow_up_p50_s": _percentile(ttfts(follow), 50),
        "ttft_follow_up_mean_s": sum(ttfts(follow)) / len(ttfts(follow)) if ttfts(follow) else 0.0,
        "ttft_follow_up_p99_s": _percentile(ttfts(follow), 99),
        "output_tok_per_s": sum(t["tokens"] for t in ok) / wall,
        "replicas_seen": len(set().union(*replicas)) if replicas else 0,
        "sessions_on_one_replica": sum(len(r) == 1 for r in replicas) if any(replicas) else None,
    }


def run_sessions(
    url: str | None,
    n_sessions: int,
    n_turns: int,
    max_tokens: int,
    api_key: str | None,
    model: str | None,
    max_num_seqs: int,
    replicas: int | None,
    policies: list[str],
    threads: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
) -> dict:
    threads = threads or max(1, os.cpu_count() or 1)
    sessions = _sessions(n_sessions, n_turns)
    result: dict = {"sessions": n_sessions, "turns": n_turns, "max_tokens": max_tokens, "servers": {}, "commands": {}}
    if url:
        result["servers"][url] = measure_sessions(url.rstrip("/"), sessions, max_tokens, api_key, url)
    if replicas:
        if threads % replicas:
            raise GearshiftError(f"--threads {threads} does not split evenly over {replicas} replicas")
        from .. import hub

        path = str(hub.resolve_model(model))
        result.update(model=Path(path).name, threads=threads, replicas=replicas, max_num_seqs=max_num_seqs)
        for policy in policies:
            name = f"{replicas} replicas, {policy}"
            with gearshift_server(
                path, max_num_seqs, threads // replicas, ["--replicas", str(replicas), "--routing", policy]
            ) as (u, cmd):
                result["commands"][name] = " ".join(cmd)
                result["servers"][name] = measure_sessions(u, sessions, max_tokens, None, name)
        with gearshift_server(path, max_num_seqs, threads) as (u, cmd):
            result["commands"]["1 replica"] = " ".join(cmd)
            result["servers"]["1 replica"] = measure_sessions(u, sessions, max_tokens, None, "1 replica")
        single = result["servers"]["1 replica"]
        result["vs_single_replica"] = {
            name: {
                "hit_rate": s["hit_rate"] / single["hit_rate"] if single["hit_rate"] else None,
                "ttft_follow_up_p50": s["ttft_follow_up_p50_s"] / single["ttft_follow_up_p50_s"]
                if single["ttft_follow_up_p50_s"]
                else None,
                "output_tok_per_s": s["output_tok_per_s"] / single["output_tok_per_s"]
                if single["output_tok_per_s"]
                else None,
            }
            for name, s in result["servers"].items()
            if name != "1 replica"
        }
    if not result["servers"]:
        raise GearshiftError("bench serve --sessions needs --url URL or --replicas N")
    return _emit(result, print_sessions, plot_sessions, json_path, plot_path)


def print_sessions(r: dict) -> None:
    print(
        f"\n{r['sessions']} multi-turn sessions x {r['turns']} turns, {r['max_tokens']} new tokens per turn"
        + (f", {r['threads']} threads in all" if "threads" in r else "")
        + "; stayed: sessions served by one replica"
    )
    print(
        f"{'server':<26} {'hit rate':>8} {'follow-up':>9} {'TTFT 1st':>9} {'TTFT f-up':>9} {'f-up mean':>9} "
        f"{'out tok/s':>9} {'stayed':>7} {'errors':>6}"
    )
    for name, s in r["servers"].items():
        stay = "" if s["sessions_on_one_replica"] is None else f"{s['sessions_on_one_replica']}/{s['sessions']}"
        hr = f"{s['hit_rate']:.1%}" if s["hit_rate"] is not None else "-"
        fr = f"{s['follow_up_hit_rate']:.1%}" if s["follow_up_hit_rate"] is not None else "-"
        print(
            f"{name[:26]:<26} {hr:>8} {fr:>9} {s['ttft_first_p50_s']:>8.2f}s {s['ttft_follow_up_p50_s']:>8.2f}s "
            f"{s['ttft_follow_up_mean_s']:>8.2f}s {s['output_tok_per_s']:>9.1f} {stay:>7} {s['errors']:>6}"
        )
    for name, v in (r.get("vs_single_replica") or {}).items():
        parts = [f"{k.replace('_', ' ')} {x:.2f}x" for k, x in v.items() if x is not None]
        print(f"{name} / 1 replica: " + ", ".join(parts))


def plot_sessions(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["servers"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title, fmt in (
        (axes[0], "hit_rate", "prefix-cache hit rate", "{:.0%}"),
        (axes[1], "ttft_follow_up_p50_s", "TTFT, follow-up turns (p50, s)", "{:.2f}"),
        (axes[2], "output_tok_per_s", "output tokens/s", "{:.1f}"),
    ):
        values = [r["servers"][n][key] or 0.0 for n in names]
        bars = ax.bar(range(len(names)), values, color=["C0", "C1", "C2", "C3"][: len(names)])
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{r['sessions']} sessions x {r['turns']} turns"
        + (f", {r['threads']} threads in all" if "threads" in r else ""),
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
