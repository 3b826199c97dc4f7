"""`gearshift bench kv`: KV cache policies on long contexts, SCBench-style.

SCBench's data is not reachable from here, so its kinds of task are generated locally from a seed,
in its format (`{id, context, multi_turns: [{input, answer}]}`, plus the task and how it is
scored), with ordinary text (Spec-Bench's questions, shuffled) as the haystack:

- `passkey`: named pass keys hidden in the text ("the pass key for the red door is 48213");
- `kv`: a JSON object of short keys and 5-digit values, a value asked by its key;
- `prefix_suffix`: a list of random strings, the one that starts with a given prefix;
- `multihop`: variable tracing: VAR A = 48213, VAR B = VAR A, ... spread through the text;
- `manyshot`: in-context learning: many examples of a made-up word -> label mapping, as a plain
  completion prompt (the default model does not follow the pattern through its chat template).
- `needle`: one named pass key alone in its own haystack (an item per question, at depths
  10%..50%): the retrieval the default model can do at 8k, where four keys of one form in one
  haystack confuse it.

The first four share one haystack per length (so the context is read once for all of them, as
SCBench's shared-context design intends); `manyshot` has its own. Scoring is SCBench's: the
answer as a substring, the first integer (`multihop`), the first word (`manyshot`).

Two modes: `multi-request` (each question a separate request on the same context: the full
context comes from the prefix cache, and a policy compresses its own copy at the end of the
prompt) and `multi-turn` (one conversation: follow-ups carry the previous answers, and a policy's
compressed cache is continued, not rebuilt: SCBench's setting, where sub-full-cache methods were
found to collapse after the first turn). Per task, mode, length, policy and budget: accuracy, the
full cache's accuracy on the same items, KV bytes, decode tokens/s and prefill time. A task the
full cache solves under half the time is flagged, so no policy is credited for keeping accuracy
that was not there.
"""

from __future__ import annotations

import json
import random
import re
import string
import sys
import time
from pathlib import Path

from ..errors import GearshiftError
from ..kv_policy import KVPolicy, duo_path
from .data import spec_bench_questions

TASKS = ("passkey", "kv", "prefix_suffix", "multihop", "manyshot", "needle")
_NAMES = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white"]
_WORDS = {
    "zorb": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "melon", "kiwi"],
    "plim": ["horse", "tiger", "eagle", "otter", "zebra", "camel", "sheep", "whale", "mouse", "llama"],
    "kesh": ["truck", "train", "plane", "canoe", "wagon", "sled", "ferry", "tram", "scooter", "yacht"],
}


def _haystack(rng: random.Random) -> list[str]:
    sentences = [q["turns"][0].strip().replace("\n", " ") for q in spec_bench_questions()]
    sentences = [x for x in sentences if len(x) <= 300]  # (long articles would leave no room to trim to a length)
    rng.shuffle(sentences)
    return sentences


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _fill(tokenizer, parts: list[str], inserts: list[str], target: int, rng: random.Random) -> str:
    """Ordinary text of at most `target` tokens with `inserts` placed at spread-out depths."""
    room = target - sum(_count(tokenizer, x) + 1 for x in inserts)
    text, n, i = [], 0, 0
    while n < room:
        s = parts[i % len(parts)]
        i += 1
        text.append(s)
        n += _count(tokenizer, s) + 1
    depths = [0.1 + 0.8 * (j + rng.random() * 0.5) / max(1, len(inserts)) for j in range(len(inserts))]
    while True:  # tokens do not add up exactly across sentence boundaries: trim until it fits
        placed = list(text)
        for depth, ins in zip(depths, inserts):  # depths 10%..90%, in order, jittered
            placed.insert(min(int(len(text) * depth), len(placed)), ins)
        out = " ".join(placed)
        if _count(tokenizer, out) <= target or not text:
            return out
        text.pop()


def generate(tokenizer, length: int, seed: int = 0, turns: int = 4) -> list[dict]:
    """The items for one context length (tokens), deterministic from the seed."""
    rng = random.Random(f"{seed}-{length}")
    parts = _haystack(rng)
    budget = length - 80 * turns  # the questions, the answers of a multi-turn chat, the chat template
    doors = rng.sample(_NAMES, turns)
    keys = [rng.randint(10000, 99999) for _ in doors]
    kv = {
        f"{rng.choice(['apple', 'river', 'stone', 'cloud', 'maple'])}-{rng.randint(10, 99)}": rng.randint(10000, 99999)
        for _ in range(12)
    }
    asked = rng.sample(sorted(kv), turns)
    strings = [
        "".join(rng.choices(string.ascii_letters + string.digits, k=4))
        + "-"
        + "".join(rng.choices(string.ascii_letters + string.digits, k=4))
        for _ in range(10)
    ]
    picked = rng.sample(strings, turns)
    chains = []
    for t in range(turns):
        names = ["".join(rng.choices(string.ascii_uppercase, k=3)) for _ in range(4)]
        value = rng.randint(10000, 99999)
        chains.append((names, value))
    inserts = [f"The pass key for the {d} door is {k}. Remember it." for d, k in zip(doors, keys)]
    inserts.append("Here is a JSON object: " + json.dumps(kv) + ".")
    inserts.append("Here is a list of codes: " + ", ".join(strings) + ".")
    for names, value in chains:
        inserts += [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    shared = _fill(tokenizer, parts, inserts, budget, rng)
    items = [
        {
            "id": f"passkey-{length}",
            "task": "passkey",
            "score": "substring",
            "context": shared,
            "multi_turns": [
                {"input": f"What is the pass key for the {d} door?", "answer": str(k)} for d, k in zip(doors, keys)
            ],
        },
        {
            "id": f"kv-{length}",
            "task": "kv",
            "score": "substring",
            "context": shared,
            "multi_turns": [
                {"input": f'In the JSON object above, what is the value of "{a}"?', "answer": str(kv[a])} for a in asked
            ],
        },
        {
            "id": f"prefix_suffix-{length}",
            "task": "prefix_suffix",
            "score": "substring",
            "context": shared,
            "multi_turns": [
                {"input": f"In the list of codes above, which code starts with {p[:4]}?", "answer": p} for p in picked
            ],
        },
        {
            "id": f"multihop-{length}",
            "task": "multihop",
            "score": "first_int",
            "context": shared,
            "multi_turns": [
                {
                    "input": f"What is the value of VAR {names[-1]}? Follow the chain of assignments and "
                    "answer with the number.",
                    "answer": str(value),
                }
                for names, value in chains
            ],
        },
    ]
    examples, n = [], 0
    pool = [(w, label) for label, words in _WORDS.items() for w in words]
    while True:
        w, label = rng.choice(pool)
        line = f"Input: {w}\nOutput: {label}"
        n += _count(tokenizer, line) + 1
        if n > budget:
            break
        examples.append(line)
    queries = rng.sample(pool, turns)
    items.append(
        {
            "id": f"manyshot-{length}",
            "task": "manyshot",
            "score": "first_word",
            "format": "raw",
            "context": "\n".join(examples),
            "multi_turns": [{"input": f"Input: {w}\nOutput:", "answer": label} for w, label in queries],
        }
    )
    for j, door in enumerate(rng.sample(_NAMES, turns)):  # needle: one key per haystack
        own = random.Random(f"{seed}-{length}-needle-{j}")
        key = own.randint(10000, 99999)
        context = _fill(
            tokenizer, _haystack(own), [f"The pass key for the {door} door is {key}. Remember it."], budget, own
        )
        items.append(
            {
                "id": f"needle-{length}-{j}",
                "task": "needle",
                "score": "substring",
                "context": context,
                "multi_turns": [{"input": f"What is the pass key for the {door} door?", "answer": str(key)}],
            }
        )
    return items


def score(kind: str, output: str, answer: str) -> bool:
    if kind == "substring":
        return answer in output
    if kind == "first_int":
        m = re.search(r"\d+", output)
        return m is not None and m.group() == answer
    words = re.findall(r"[A-Za-z]+", output)
    return bool(words) and words[0].lower() == answer.lower()


def _run_item(llm, item: dict, mode: str, policy: str, budget: int | None, max_tokens: int) -> list[dict]:
    kv = {} if policy == "full" else {"kv_policy": policy, "kv_budget": budget}
    out, history = [], None
    raw = item.get("format") == "raw"  # a completion prompt (in-context examples), not a chat
    for turn in item["multi_turns"]:
        if raw:
            prompt = (item["context"] if mode == "multi-request" or history is None else history) + "\n" + turn["input"]
        elif mode == "multi-request" or history is None:
            prompt = [{"role": "user", "content": item["context"] + "\n\n" + turn["input"]}]
        else:
            prompt = history + [{"role": "user", "content": turn["input"]}]
        c = llm.generate(prompt, max_tokens=max_tokens, ignore_eos=True, **kv)
        answer = c.text
        history = (
            prompt + " " + answer.strip().split("\n")[0] if raw else prompt + [{"role": "assistant", "content": answer}]
        )
        st = c.stats
        out.append(
            {
                "correct": score(item["score"], answer, turn["answer"]),
                "kv_bytes": st.kv_bytes,
                "prompt_tokens": c.prompt_tokens,
                "full_kv_bytes": st.kv_full_bytes,
                "decode_tok_per_s": st.tok_per_s,
                "prefill_s": st.timing.prefill_s,
                "output": answer[:80],
            }
        )
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_kv(
    model: str | None,
    lengths: list[int],
    policies: list[str],
    budgets: list[int],
    modes: list[str],
    tasks: list[str],
    seed: int = 0,
    max_tokens: int = 16,
    data_out: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    device: str | None = None,
) -> dict:
    from tqdm import tqdm

    from ..llm import load
    from .bench import _emit

    parsed = {p: KVPolicy(p) for p in policies}  # (a bad name is a one-line error before anything loads)
    if any(not x.active for x in parsed.values()):
        raise GearshiftError("the full cache is always measured: leave it out of --policies")
    llm = load(model, device=device, max_num_seqs=4)
    if any(x.name == "duo" for x in parsed.values()) and not duo_path(llm.loaded.path).exists():
        raise GearshiftError("the duo policy needs this model's head file: run `gearshift calibrate-duo` first")
    if max(lengths) + max_tokens > llm.core.window:
        raise GearshiftError(f"a {max(lengths)}-token context does not fit the model's {llm.core.window}-token window")
    rows, data = [], []
    configs = [("full", None)] + [
        (p, b if parsed[p].evicts else None) for p in policies for b in (budgets if parsed[p].evicts else budgets[:1])
    ]  # (quantizing alone: no budget)
    total = len(lengths) * (len(tasks) + 3 * ("needle" in tasks)) * len(modes) * len(configs)
    with tqdm(total=total, desc="bench kv", unit="run", file=sys.stderr) as bar:
        for length in lengths:
            items = [i for i in generate(llm.tokenizer, length, seed) if i["task"] in tasks]
            data += items
            for item in items:
                for mode in modes:
                    if mode == "multi-turn" and len(item["multi_turns"]) == 1:
                        bar.update(len(configs))
                        continue  # one question: multi-turn is multi-request
                    full = None
                    for policy, budget in configs:
                        bar.set_postfix_str(f"{length} {item['task']} {mode} {policy} {budget or ''}")
                        if budget is not None and budget >= length:
                            bar.update(1)
                            continue  # keeps everything: the full cache's result
                        t0 = time.perf_counter()
                        if policy != "full" and full is None:  # nothing to compare with
                            bar.update(1)
                            continue
                        try:
                            turns = _run_item(llm, item, mode, policy, budget, max_tokens)
                        except GearshiftError as e:  # recorded, and the rest goes on
                            rows.append(
                                {
                                    "task": item["task"],
                                    "mode": mode,
                                    "length": length,
                                    "policy": policy,
                                    "budget": budget,
                                    "error": str(e),
                                }
                            )
                            bar.update(1)
                            continue
                        row = {
                            "task": item["task"],
                            "mode": mode,
                            "length": length,
                            "policy": policy,
                            "budget": budget,
                            "accuracy": _mean([t["correct"] for t in turns]),
                            "turn_accuracy": [float(t["correct"]) for t in turns],
                            "kv_bytes": _mean([t["kv_bytes"] for t in turns]),
                            "decode_tok_per_s": _mean([t["decode_tok_per_s"] for t in turns]),
                            "prefill_s": _mean([t["prefill_s"] for t in turns]),
                            "prompt_tokens": _mean([t["prompt_tokens"] for t in turns]),
                            "seconds": time.perf_counter() - t0,
                            "outputs": [t["output"] for t in turns],
                        }
                        if policy == "full":
                            full = row
                            row["full_kv_bytes_turns"] = [t["full_kv_bytes"] for t in turns]
                        row.update(
                            full_accuracy=full["accuracy"],
                            full_turn_accuracy=full["turn_accuracy"],
                            full_kv_bytes=full["kv_bytes"],
                            full_decode_tok_per_s=full["decode_tok_per_s"],
                            relative_accuracy=row["accuracy"] / full["accuracy"] if full["accuracy"] else None,
                            full_solves=full["accuracy"] >= 0.5,
                        )
                        rows.append(row)
                        bar.update(1)
                        if json_path:  # as it goes: a long run that is stopped keeps what it measured
                            Path(json_path).write_text(json.dumps({"partial": True, "results": rows}, indent=1))
    if data_out:
        Path(data_out).parent.mkdir(parents=True, exist_ok=True)
        Path(data_out).write_text("".join(json.dumps(i) + "\n" for i in data))
    result = {
        "model": str(llm.loaded.path),
        "seed": seed,
        "max_tokens": max_tokens,
        "results": rows,
        "summary": summarize(rows),
    }
    return _emit(result, print_kv, plot_kv, json_path, plot_path)


def summarize(rows: list[dict]) -> list[dict]:
    """Per mode, length, policy and budget, over the tasks the full cache solves: accuracy relative
    to it, decode speed and KV bytes against it."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["policy"] != "full" and r.get("full_solves"):
            groups.setdefault((r["mode"], r["length"], r["policy"], r["budget"]), []).append(r)
    out = []
    for (mode, length, policy, budget), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])
    ):
        out.append(
            {
                "mode": mode,
                "length": length,
                "policy": policy,
                "budget": budget,
                "tasks": len(rs),
                "relative_accuracy": _mean([r["accuracy"] for r in rs]) / _mean([r["full_accuracy"] for r in rs]),
                "later_turns_relative": _later(rs),
                "decode_speedup": _mean(
                    [r["decode_tok_per_s"] / r["full_decode_tok_per_s"] for r in rs if r["full_decode_tok_per_s"]]
                ),
                "kv_reduction": _mean([r["full_kv_bytes"] / r["kv_bytes"] for r in rs if r["kv_bytes"]]),
            }
        )
    return out


def _later(rs: list[dict]) -> float | None:
    """Accuracy on turns after the first, relative to the full cache's (multi-turn collapse)."""
    ours = [a for r in rs for a in r["turn_accuracy"][1:]]
    full = [a for r in rs for a in r["full_turn_accuracy"][1:]]
    return _mean(ours) / _mean(full) if full and _mean(full) else None


def print_kv(r: dict) -> None:
    print(
        f"{'task':<14} {'mode':<14} {'len':>5} {'policy':<10} {'budget':>6} {'acc':>5} {'full':>5} "
        f"{'KV MiB':>7} {'full':>7} {'tok/s':>6} {'full':>6} {'prefill':>7}"
    )
    for x in r["results"]:
        if "error" in x:
            print(
                f"{x['task']:<14} {x['mode']:<14} {x['length']:>5} {x['policy']:<10} {x['budget'] or '':>6} "
                f"error: {x['error']}"
            )
            continue
        flag = "" if x["full_solves"] else "  (full cache < 50%)"
        print(
            f"{x['task']:<14} {x['mode']:<14} {x['length']:>5} {x['policy']:<10} {x['budget'] or '':>6} "
            f"{x['accuracy']:>5.2f} {x['full_accuracy']:>5.2f} {x['kv_bytes'] / 2**20:>7.1f} "
            f"{x['full_kv_bytes'] / 2**20:>7.1f} {x['decode_tok_per_s']:>6.1f} {x['full_decode_tok_per_s']:>6.1f} "
            f"{x['prefill_s']:>6.2f}s{flag}"
        )
    print("\nover tasks the full cache solves:")
    for s in r["summary"]:
        later = f"{s['later_turns_relative']:.2f}" if s["later_turns_relative"] is not None else "-"
        print(
            f"{s['mode']:<14} {s['length']:>5} {s['policy']:<10} {s['budget'] or '-':>6}: accuracy "
            f"{s['relative_accuracy']:.2f} of full (later turns: {later}), decode {s['decode_speedup']:.2f}x, "
            f"KV {s['kv_reduction']:.1f}x smaller ({s['tasks']} tasks)"
        )


def plot_kv(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    done = [x for x in r["results"] if "error" not in x]
    longest = max(x["length"] for x in done)
    for i, policy in enumerate(sorted({x["policy"] for x in r["summary"]})):
        pts = sorted(
            (s["budget"] or 0, s["relative_accuracy"])
            for s in r["summary"]
            if s["policy"] == policy and s["length"] == longest and s["mode"] == "multi-request"
        )
        if pts and pts[0][0] == 0:  # quantized alone: no budget, a level
            a.axhline(pts[0][1], ls=":", lw=1.5, color=f"C{i % 10}", label=f"{policy} (keeps all)")
        elif pts:
            a.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=policy)
    a.axhline(1.0, color="gray", lw=0.8, ls="--")
    a.set(
        xscale="log",
        xlabel="KV budget (entries per layer and head)",
        ylabel="accuracy / full cache's",
        title=f"accuracy vs budget ({longest} tokens, multi-request)",
    )
    speeds: dict[str, dict[int, list[float]]] = {}
    for x in done:
        label = x["policy"] if x["budget"] is None else f"{x['policy']} {x['budget']}"
        speeds.setdefault(label, {}).setdefault(x["length"], []).append(x["decode_tok_per_s"])
    for label, by_len in sorted(speeds.items()):
        ls = sorted(by_len)
        b.plot(ls, [_mean(by_len[n]) for n in ls], marker="o", label=label, lw=2.5 if label == "full" else 1)
    b.set(xscale="log", xlabel="context length (tokens)", ylabel="decode tokens/s", title="decode speed vs context")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
