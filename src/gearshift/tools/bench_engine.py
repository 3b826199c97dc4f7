"""Benchmarks of the engine under load: `bench batch` (continuous batching) and `bench multiturn`
(the prefix cache across the turns of chats). Both drive `EngineCore` the way a server would:
requests arrive, `step` runs, every output is timed as it comes back.

bench batch: at each concurrency level c, c clients send Spec-Bench questions (first turns, in
order), each sending its next question as soon as its last answer is complete (the first c
arrive together); plain greedy decoding. Every level answers the same questions, so its
aggregate throughput is compared with level 1's in the same run, and its outputs with level
1's (continuous batching must not change an answer). `--rate` adds an open-loop run: questions
arrive at a fixed rate whatever the engine's progress (queueing counts in time to first token).

bench multiturn: chats of several turns (Spec-Bench's two-turn MT-bench questions, then
follow-ups from a fixed list), turns taken in rotation across the chats; each turn's time to
first token with the prefix cache, against the same turn read from a cold cache.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .. import hub
from ..core import EngineCore
from ..errors import GearshiftError
from ..llm import LLM
from ..loading import load
from .bench import _emit
from .data import spec_bench_questions

FOLLOW_UPS = [
    "Can you give a concrete example?",
    "Summarize that in one sentence.",
    "What is a common mistake people make about this?",
    "Explain it to a ten-year-old.",
    "Which part of your answer matters most, and why?",
    "What would change if it were the other way round?",
]


@dataclass
class _Timeline:
    """When a request arrived and when each of its tokens came back."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _drive(core: EngineCore, requests: list, arrivals: list[float] | None, clients: int, bar) -> list[_Timeline]:
    """Run `requests` through `core`: closed loop with `clients` clients, or at the given arrival
    offsets (seconds from the start). Returns every request's timeline, in request order."""
    pending = deque(range(len(requests)))
    lines: dict[int, _Timeline] = {}
    owner: dict[int, int] = {}  # sequence id -> request index
    start = time.perf_counter()
    in_flight = 0
    while pending or core.has_work():
        now = time.perf_counter()
        while pending and (in_flight < clients if arrivals is None else arrivals[pending[0]] <= now - start):
            i = pending.popleft()
            arrived = now if arrivals is None else start + arrivals[i]
            requests[i].arrival = arrived
            owner[core.add(requests[i])] = i
            lines[i] = _Timeline(arrived)
            in_flight += 1
        if not core.has_work():  # open loop, nothing running: wait for the next arrival
            time.sleep(max(0.0, start + arrivals[pending[0]] - time.perf_counter()))
            continue
        outs = core.step()
        done = time.perf_counter()
        for out in outs:
            line = lines[owner[out.seq_id]]
            line.tokens += out.token_ids
            line.token_times += [done] * len(out.token_ids)
            if out.completion is not None:
                in_flight -= 1
                bar.update(1)
    return [lines[i] for i in range(len(requests))]


def _pooled(runs: list[list[_Timeline]]) -> dict:
    """One level's repeated runs as one: tokens over the runs' summed durations, latencies pooled."""
    parts = [_summary(lines) for lines in runs]
    merged = _summary([t for lines in runs for t in lines])
    seconds = sum(p["seconds"] for p in parts)
    merged.update(
        seconds=seconds, tok_per_s=merged["generated_tokens"] / seconds, tok_per_s_runs=[p["tok_per_s"] for p in parts]
    )
    return merged


def _summary(lines: list[_Timeline]) -> dict:
    first = min(t.arrival for t in lines)
    last = max(t.token_times[-1] if t.token_times else t.arrival for t in lines)
    ttft = [t.token_times[0] - t.arrival for t in lines if t.token_times]
    itl = [b - a for t in lines for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.tokens) for t in lines)
    return {
        "requests": len(lines),
        "generated_tokens": tokens,
        "seconds": last - first,
        "tok_per_s": tokens / (last - first),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "ttft_max_s": max(ttft, default=0.0),
        "itl_p50_s": _percentile(itl, 50),
        "itl_p99_s": _percentile(itl, 99),
    }


def run_batch(
    model: str | None,
    levels: list[int],
    n_requests: int = 16,
    max_new_tokens: int = 128,
    rate: float | None = None,
    max_batched_tokens: int = 256,
    prefix_cache: bool = True,
    repeats: int = 1,
    json_path: str | None = None,
    plot_path: str | None = None,
    device: str | None = None,
) -> dict:
    """`repeats` > 1 runs the levels forward, then backward, and so on, and pools each level's runs:
    a machine whose speed drifts during the benchmark then weighs on every level alike."""
    if not levels or min(levels) < 1:
        raise GearshiftError("--concurrency takes positive integers, e.g. 1,2,4,8,16")
    if rate is not None and rate <= 0:
        raise GearshiftError("--rate is requests per second and must be positive")
    if repeats < 1:
        raise GearshiftError("--repeats must be at least 1")
    loaded = load(hub.resolve_model(model), device=device)
    base = LLM(loaded)
    questions = spec_bench_questions(max(n_requests, max(levels)))
    prompts = [base.encode([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    base.generate(prompts[0][:16], max_tokens=4)  # warm-up

    def requests():
        return [r for p in prompts for r in base.requests(p, max_tokens=max_new_tokens)]

    def engine(c: int) -> EngineCore:  # a fresh core per run: nothing cached from the last one
        return LLM(loaded, max_num_seqs=c, max_batched_tokens=max_batched_tokens, prefix_cache=prefix_cache).core

    results: dict = {
        "model": loaded.path.name,
        "max_new_tokens": max_new_tokens,
        "requests": len(prompts),
        "max_batched_tokens": max_batched_tokens,
        "prefix_cache": prefix_cache,
        "repeats": repeats,
        "arrival": "closed loop: c clients, the first c arrive together",
        "levels": {},
    }
    levels = sorted(set(levels))
    outputs: dict[int, list] = {}
    runs: dict[int, list[_Timeline]] = {c: [] for c in levels}
    with tqdm(
        total=repeats * len(levels) * len(prompts) + (len(prompts) if rate else 0), desc="bench batch", unit="request"
    ) as bar:
        for r in range(repeats):
            for c in levels if r % 2 == 0 else levels[::-1]:
                lines = _drive(engine(c), requests(), None, c, bar)
                runs[c].append(lines)
                outputs.setdefault(c, [t.tokens for t in lines])
        for c in levels:
            results["levels"][str(c)] = _pooled(runs[c])
        if rate:
            c = max(levels)
            arrivals = [i / rate for i in range(len(prompts))]
            lines = _drive(engine(c), requests(), arrivals, c, bar)
            results["rate"] = {
                "requests_per_s": rate,
                "max_num_seqs": c,
                **_summary(lines),
                "identical_to_1": [t.tokens for t in lines] == outputs.get(min(levels)),
            }
    ref = outputs[min(levels)]
    for c, outs in outputs.items():
        results["levels"][str(c)]["identical_to_1"] = sum(o == r for o, r in zip(outs, ref)) / len(ref)
    one = results["levels"][str(min(levels))]["tok_per_s"]
    results["relative_to_1"] = {k: v["tok_per_s"] / one for k, v in results["levels"].items()}
    return _emit(results, _print_batch, _plot_batch, json_path, plot_path)


def _print_batch(r: dict) -> None:
    print(
        f"\ncontinuous batching on {r['model']}: {r['requests']} Spec-Bench questions per level, greedy, "
        f"{r['max_new_tokens']} new tokens, prefix cache {'on' if r['prefix_cache'] else 'off'}, {r['arrival']}"
        f"{', runs per level: ' + str(r['repeats']) + ' (levels up, then down)' if r['repeats'] > 1 else ''}"
    )
    print(f"{'conc.':>6}{'tok/s':>9}{'vs 1':>7}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  same as 1")
    for c, v in r["levels"].items():
        print(
            f"{c:>6}{v['tok_per_s']:>9.1f}{r['relative_to_1'][c]:>6.2f}x{v['ttft_p50_s']:>9.2f}s{v['ttft_p99_s']:>9.2f}s"
            f"{1000 * v['itl_p50_s']:>7.0f}ms{1000 * v['itl_p99_s']:>7.0f}ms  {v['identical_to_1']:.0%}"
        )
    if "rate" in r:
        v = r["rate"]
        print(
            f"open loop, {v['requests_per_s']:g} requests/s, {v['max_num_seqs']} slots: {v['tok_per_s']:.1f} tok/s, "
            f"TTFT p50 {v['ttft_p50_s']:.2f}s p99 {v['ttft_p99_s']:.2f}s, ITL p50 {1000 * v['itl_p50_s']:.0f}ms "
            f"p99 {1000 * v['itl_p99_s']:.0f}ms, same as 1: {'yes' if v['identical_to_1'] else 'NO'}"
        )


def _plot_batch(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(r["levels"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(levels, [r["levels"][c]["tok_per_s"] for c in levels], "o-")
    for c in levels:
        a.annotate(
            f"{r['relative_to_1'][c]:.2f}x",
            (c, r["levels"][c]["tok_per_s"]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    a.set_xlabel("concurrent requests")
    a.set_ylabel("aggregate tokens / s")
    a.set_title("throughput")
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p50_s", "s-"), ("itl_p99_s", "s--")):
        b.plot(levels, [r["levels"][c][key] for c in levels], style, label=key.replace("_s", "").replace("_", " "))
    b.set_yscale("log")
    b.set_xlabel("concurrent requests")
    b.set_ylabel("seconds")
    b.set_title("latency")
    b.legend(fontsize=8)
    fig.suptitle(f"{r['model']}: continuous batching, {r['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- multi-turn chats


def run_multiturn(
    model: str | None,
    n_chats: int = 4,
    n_turns: int = 5,
    max_new_tokens: int = 128,
    json_path: str | None = None,
    plot_path: str | None = None,
    device: str | None = None,
) -> dict:
    if n_chats < 1 or n_turns < 1:
        raise GearshiftError("--chats and --turns must be positive")
    loaded = load(hub.resolve_model(model), device=device)
    warm = LLM(loaded, max_num_seqs=max(1, n_chats))  # the chats' engine: prefix cache on
    cold = LLM(loaded, max_num_seqs=1, prefix_cache=False)
    mt = [q for q in spec_bench_questions() if len(q.get("turns", [])) >= 2][:n_chats]
    if len(mt) < n_chats:
        raise GearshiftError(f"only {len(mt)} two-turn questions in the Spec-Bench data")
    rng = random.Random(0)
    chats = [
        {"id": q["question_id"], "users": q["turns"][:2] + rng.sample(FOLLOW_UPS, max(0, n_turns - 2)), "messages": []}
        for q in mt
    ]
    warm.generate("Hello", max_tokens=2)
    cold.generate("Hello", max_tokens=2)
    per_turn = [[] for _ in range(n_turns)]
    with tqdm(total=n_chats * n_turns, desc="bench multiturn", unit="turn") as bar:
        for t in range(n_turns):
            for chat in chats:  # turns in rotation across the chats, as several users would take them
                chat["messages"].append({"role": "user", "content": chat["users"][t]})
                c = warm.generate(chat["messages"], max_tokens=max_new_tokens)
                first = cold.generate(chat["messages"], max_tokens=1)  # the same turn from a cold cache
                per_turn[t].append(
                    {
                        "ttft_cached_s": c.stats.timing.ttft_s,
                        "ttft_cold_s": first.stats.timing.ttft_s,
                        "cached_tokens": c.cached_tokens,
                        "prompt_tokens": c.prompt_tokens,
                        "same_first_token": c.token_ids[:1] == first.token_ids[:1],
                    }
                )
                chat["messages"].append({"role": "assistant", "content": c.text})
                bar.update(1)
    turns = []
    for t, rows in enumerate(per_turn, start=1):
        mean = {
            k: float(np.mean([row[k] for row in rows]))
            for k in ("ttft_cached_s", "ttft_cold_s", "cached_tokens", "prompt_tokens")
        }
        turns.append(
            {
                "turn": t,
                **mean,
                "ratio": mean["ttft_cached_s"] / mean["ttft_cold_s"],
                "same_first_token": all(row["same_first_token"] for row in rows),
            }
        )
    results = {
        "model": loaded.path.name,
        "chats": n_chats,
        "max_new_tokens": max_new_tokens,
        "follow_ups": "turns 1-2: Spec-Bench MT-bench; later turns: drawn from a fixed list",
        "turns": turns,
    }
    return _emit(results, _print_multiturn, _plot_multiturn, json_path, plot_path)


def _print_multiturn(r: dict) -> None:
    print(
        f"\nmulti-turn chats on {r['model']}: {r['chats']} chats, {r['max_new_tokens']} new tokens per answer; "
        "time to first token, mean over chats"
    )
    print(f"{'turn':>5}{'prompt':>8}{'cached':>8}{'TTFT cached':>13}{'TTFT cold':>11}{'ratio':>7}  same first token")
    for t in r["turns"]:
        print(
            f"{t['turn']:>5}{t['prompt_tokens']:>8.0f}{t['cached_tokens']:>8.0f}{t['ttft_cached_s']:>12.3f}s"
            f"{t['ttft_cold_s']:>10.3f}s{t['ratio']:>7.2f}  {'yes' if t['same_first_token'] else 'NO'}"
        )


def _plot_multiturn(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [t["turn"] for t in r["turns"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(turns, [t["ttft_cold_s"] for t in r["turns"]], "o-", label="cold cache")
    ax.plot(turns, [t["ttft_cached_s"] for t in r["turns"]], "o-", label="prefix cache")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_xticks(turns)
    ax.set_title(f"{r['model']}: {r['chats']} chats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
