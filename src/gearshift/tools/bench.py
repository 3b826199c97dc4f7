"""Benchmarks of single-stream speed, run side by side with the baselines in one process so ratios
are meaningful: `bench --quick`, `bench spec-bench`, `bench ead`. Each runs with the prefix cache
off, so every method reads every prompt as a new user would (the methods take turns on the same
questions)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import hardware, hub
from ..ead import EAD
from ..llm import LLM
from ..loading import load
from . import llama_cpp
from .data import data_dir, read_jsonl, spec_bench_questions


def _time_engine(name: str, run, prompts: list) -> dict:
    """Total generated tokens over total wall time (prefill included), after one warm-up call."""
    run(prompts[0][:16])
    outs = [run(ids) for ids in tqdm(prompts, desc=name, unit="q")]
    tokens, seconds = sum(len(o["tokens"]) for o in outs), sum(o["seconds"] for o in outs)
    return {
        "tok_per_s": tokens / seconds,
        "generated_tokens": tokens,
        "seconds": seconds,
        "outputs": [o["tokens"] for o in outs],
    }


def _emit(results: dict, printer, plotter, json_path: str | None, plot_path: str | None) -> dict:
    printer(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    if plot_path:
        plotter(results, plot_path)
    return results


def run_quick(
    model: str | None,
    n_questions: int = 10,
    max_new_tokens: int = 128,
    json_path: str | None = None,
    plot_path: str | None = None,
    with_transformers: bool = True,
    device: str | None = None,
    llama_cpp_dir: str | None = None,
) -> dict:
    """Plain greedy decoding of the same prompts by gearshift (packed and float32 weights),
    transformers and, when `build-llama-cpp` has run, llama.cpp's server (same file, same threads);
    then the memory-bandwidth roofline and the verify curve (cost of a k-token forward), all in
    this run."""
    path = hub.resolve_model(model)
    questions = spec_bench_questions(n_questions)
    t0 = time.perf_counter()
    load(path, device=device, use_cache=False)
    cold_s = time.perf_counter() - t0
    load(path, device=device)  # writes the conversion cache if missing
    warm = load(path, device=device)
    llm = LLM(warm, prefix_cache=False)
    prompts = [llm.encode([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    results: dict = {"model": path.name, "max_new_tokens": max_new_tokens, "questions": len(prompts), "engines": {}}
    eng = results["engines"]
    eng["gearshift"] = _time_engine("gearshift", _ours(llm, None, max_new_tokens), prompts)
    eng["gearshift"].update(weights=llm.model.fmts, load_cold_s=cold_s, load_warm_s=warm.load_seconds)
    exact = LLM(load(path, device=device, weights="float32"), prefix_cache=False)
    eng["gearshift-float32"] = _time_engine("gearshift float32", _ours(exact, None, max_new_tokens), prompts)
    eng["gearshift-float32"]["weights"] = exact.model.fmts
    del exact
    if with_transformers:
        t0 = time.perf_counter()
        hf = _hf_methods(path, None, max_new_tokens, device)["hf-plain"]
        load_s = time.perf_counter() - t0
        eng["transformers"] = {**_time_engine("transformers", hf, prompts), "load_s": load_s}
        results["speedup_vs_transformers"] = eng["gearshift"]["tok_per_s"] / eng["transformers"]["tok_per_s"]
        ref = eng["transformers"]["outputs"]
        for name in ("gearshift", "gearshift-float32"):
            eng[name]["identical_to_transformers"] = sum(o == r for o, r in zip(eng[name]["outputs"], ref)) / len(ref)
    threads = torch.get_num_threads()
    prefill = {str(n): _prefill_rate(llm, n) for n in PREFILL_LENGTHS}
    results["prefill_tok_per_s"] = {n: rate for n, (rate, _) in prefill.items()}
    # what the slot holds after each prompt (a sliding-window layer: its window, `kv_cache.KVCache.slide`)
    # beside every position of every layer
    results["kv_cache_mib"] = {
        n: {"held": st.kv_bytes / 2**20, "every_position": st.kv_full_bytes / 2**20} for n, (_, st) in prefill.items()
    }
    if path.is_file() and llama_cpp.binary("llama-server", llama_cpp_dir):
        with llama_cpp.Server(path, threads, prefix=llama_cpp_dir) as server:
            eng["llama.cpp"] = {
                **_time_engine("llama.cpp", lambda ids: server.complete(ids, max_new_tokens), prompts),
                "threads": threads,
            }
        results["llama_cpp"] = {
            "tok_per_s": eng["llama.cpp"]["tok_per_s"],
            "threads": threads,
            "server": " ".join(server.cmd),
        }
        results["ratio_vs_llama_cpp"] = eng["gearshift"]["tok_per_s"] / eng["llama.cpp"]["tok_per_s"]
        results["agreement_vs_llama_cpp"] = agreement(
            llm, prompts, eng["gearshift"]["outputs"], eng["llama.cpp"]["outputs"], AGREEMENT_TOKENS
        )
        lb = llama_cpp.bench(path, threads, prefix=llama_cpp_dir)
        if lb:
            results["llama_cpp"].update(pp512=lb["pp512"], tg128=lb["tg128"], bench=lb["command"])
            results["ratio_vs_llama_cpp_tg128"] = eng["gearshift"]["tok_per_s"] / lb["tg128"]
            results["prefill_ratio_vs_llama_cpp_pp512"] = results["prefill_tok_per_s"]["512"] / lb["pp512"]
    for e in eng.values():
        e.pop("outputs", None)
    # the roofline: bytes a decode step reads (weights + KV at the mean context) over the bandwidth
    context = sum(len(p) for p in prompts) / len(prompts) + max_new_tokens / 2
    bandwidth = hardware.memory_bandwidth()
    per_token = hardware.bytes_per_token(llm.model, int(context))
    results["roofline"] = {
        "bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_token": per_token,
        "tok_per_s": bandwidth / per_token,
        "context": int(context),
    }
    results["roofline_fraction"] = eng["gearshift"]["tok_per_s"] / (bandwidth / per_token)
    costs = hardware.measure(llm.model, sizes=VERIFY_SIZES)
    results["forward_cost_ms"] = {str(n): 1000 * c for n, c in zip(costs.sizes, costs.seconds)}
    return _emit(results, _print_quick, _plot_quick, json_path, plot_path)


AGREEMENT_TOKENS = 64


def agreement(llm: LLM, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]], n: int) -> dict:
    """How far two engines' greedy outputs agree: per prompt, the tokens both wrote before they first
    part (of the first n), and there, our logit gaps: top-1 to top-2, and top-1 to the token the other
    engine chose. Partings at small gaps are near-ties that rounding decides (quantized kernels, int8
    or int16 activations); a large gap would be a real difference in the model."""
    rows = []
    for ids, a, b in zip(prompts, ours, theirs):
        a, b = a[:n], b[:n]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row = {"agree": same, "of": min(n, len(a), len(b))}
        if same < row["of"]:
            seq = ids + a[:same]  # every row is computed as decoding computed it (exact attention)
            logits = llm.model.run(seq, llm.model.new_cache(1, len(seq)), logits_from=len(seq) - 1)[-1]
            top = logits.topk(2)
            row.update(
                ours=a[same],
                theirs=b[same],
                top2_gap=float(top.values[0] - top.values[1]),
                gap_to_theirs=float(logits[a[same]] - logits[b[same]]),
                theirs_rank=int((logits > logits[b[same]]).sum()),
            )
        rows.append(row)
    agree, total = sum(r["agree"] for r in rows), sum(r["of"] for r in rows)
    return {"tokens": n, "fraction": agree / max(total, 1), "prompts": rows}


VERIFY_SIZES = (1, 2, 4, 8, 16)
PREFILL_LENGTHS = (512, 4096)


def _prefill_rate(llm: LLM, n: int, reps: int = 2) -> tuple[float, object]:
    """Prompt tokens/s reading an n-token prompt (random tokens, prefix cache off): n over the
    time to the first token, best of `reps`, as llama.cpp's ppN measures prompt processing; and the
    last completion's stats (what its KV cache held)."""
    ids = torch.randint(0, llm.model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    runs = [llm.generate(ids, max_tokens=1).stats for _ in range(reps)]
    return n / min(st.timing.ttft_s for st in runs), runs[-1]


def _print_quick(r: dict) -> None:
    print(f"\nmodel: {r['model']}   {r['questions']} Spec-Bench questions, greedy, {r['max_new_tokens']} new tokens")
    print(f"{'engine':<20}{'tok/s':>9}{'tokens':>9}  notes")
    for name, e in r["engines"].items():
        notes = []
        if "weights" in e:
            notes.append("weights " + "/".join(sorted(set(e["weights"].values()))))
        if "identical_to_transformers" in e:
            notes.append(f"{e['identical_to_transformers']:.0%} outputs identical to transformers")
        for k in ("load_cold_s", "load_warm_s", "load_s"):
            if k in e:
                notes.append(f"{k.replace('_s', '')} {e[k]:.2f}s")
        print(f"{name:<20}{e['tok_per_s']:>9.1f}{e['generated_tokens']:>9}  {', '.join(notes)}")
    if "speedup_vs_transformers" in r:
        print(f"speedup vs transformers: {r['speedup_vs_transformers']:.2f}x")
    if "ratio_vs_llama_cpp" in r:
        print(f"ratio to llama.cpp (llama-server, same prompts): {r['ratio_vs_llama_cpp']:.2f}")
    if "agreement_vs_llama_cpp" in r:
        ag = r["agreement_vs_llama_cpp"]
        parted = [p for p in ag["prompts"] if "top2_gap" in p]
        gaps = ", ".join(f"{p['agree']}: {p['top2_gap']:.2f}/{p['gap_to_theirs']:.2f}" for p in parted)
        print(
            f"greedy agreement with llama.cpp (first {ag['tokens']} tokens): {ag['fraction']:.1%}"
            + (f"; where they part (token: our top-2 gap/gap to llama.cpp's token): {gaps}" if parted else "")
        )
    if "ratio_vs_llama_cpp_tg128" in r:
        lc = r["llama_cpp"]
        print(
            f"llama-bench: tg128 {lc['tg128']:.1f} tok/s (ratio {r['ratio_vs_llama_cpp_tg128']:.2f}), "
            f"pp512 {lc['pp512']:.1f} tok/s"
        )
    if "prefill_tok_per_s" in r:
        pf = r["prefill_tok_per_s"]
        extra = (
            f" (ratio to llama.cpp pp512: {r['prefill_ratio_vs_llama_cpp_pp512']:.2f})"
            if "prefill_ratio_vs_llama_cpp_pp512" in r
            else ""
        )
        print("prefill tok/s: " + ", ".join(f"{k} tokens: {v:.0f}" for k, v in pf.items()) + extra)
    if "kv_cache_mib" in r:
        kv = r["kv_cache_mib"]
        print(
            "KV cache after the prompt: "
            + ", ".join(f"{k} tokens: {v['held']:.1f} MiB held of {v['every_position']:.1f}" for k, v in kv.items())
        )
    if "roofline" in r:
        rf = r["roofline"]
        print(
            f"roofline: {rf['bytes_per_token'] / 1e6:.1f} MB/token at {rf['bandwidth_gb_s']:.1f} GB/s = "
            f"{rf['tok_per_s']:.0f} tok/s; gearshift reaches {r['roofline_fraction']:.0%} of it"
        )
    if "forward_cost_ms" in r:
        one = r["forward_cost_ms"]["1"]
        print(
            "verify curve (ms per forward of k tokens): "
            + ", ".join(f"k={k}: {v:.1f} ({v / one:.2f}x)" for k, v in r["forward_cost_ms"].items())
        )


def _plot_quick(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["engines"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [r["engines"][n]["tok_per_s"] for n in names], color="tab:blue")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{r['model']}: greedy decoding, {r['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- Spec-Bench

SPEC_BENCH_GROUPS = {  # Spec-Bench reports MT-bench's eight categories as one "multi-turn" column
    "writing": "mt_bench",
    "roleplay": "mt_bench",
    "reasoning": "mt_bench",
    "math": "mt_bench",
    "coding": "mt_bench",
    "extraction": "mt_bench",
    "stem": "mt_bench",
    "humanities": "mt_bench",
}


def spec_bench_sample(per_category: int) -> list[dict]:
    """The first `per_category` questions of each Spec-Bench category (first turn only)."""
    seen: dict[str, int] = {}
    out = []
    for q in spec_bench_questions():
        cat = SPEC_BENCH_GROUPS.get(q["category"], q["category"])
        if seen.get(cat, 0) < per_category:
            seen[cat] = seen.get(cat, 0) + 1
            out.append({**q, "group": cat})
    return out


def run_spec_bench(
    model: str | None,
    per_category: int = 2,
    max_new_tokens: int = 128,
    draft: str | None = None,
    drafters: list[str] | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    with_transformers: bool = True,
    device: str | None = None,
    llama_cpp_dir: str | None = None,
) -> dict:
    """Every method on the same questions in one process; speedups are relative to our plain decoding.
    llama.cpp's server (plain greedy, same file and threads) joins when `build-llama-cpp` has run."""
    path = hub.resolve_model(model)
    llm = LLM(load(path, device=device), prefix_cache=False)
    questions = spec_bench_sample(per_category)
    prompts = [llm.encode([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    names = drafters or ["lookup", "early-exit", "recycling", "suffix", "hybrid"] + (
        [f"model:{draft}"] if draft else []
    )
    methods: dict = {"plain": _ours(llm, None, max_new_tokens)}
    for spec in dict.fromkeys(names):
        kind, _, arg = spec.partition(":")
        name = "early-exit-head" if kind == "early-exit" and arg and not arg.isdigit() else kind  # a trained exit
        if name in methods:  # a second drafter of a kind: named by its argument (a directory by its name)
            name = f"{name}:{Path(arg).name}" if f"{name}:{Path(arg).name}" not in methods else spec
        methods[name] = _ours(llm, llm.drafter(spec), max_new_tokens)
    if with_transformers:
        methods.update(_hf_methods(path, draft, max_new_tokens, device))
    with contextlib.ExitStack() as stack:
        if path.is_file() and llama_cpp.binary("llama-server", llama_cpp_dir):  # plain decoding, the CPU anchor
            server = stack.enter_context(llama_cpp.Server(path, torch.get_num_threads(), prefix=llama_cpp_dir))

            def llama(ids):
                out = server.complete(ids, max_new_tokens)
                return {**out, "forwards": len(out["tokens"]), "consumed": len(out["tokens"])}

            methods["llama.cpp"] = llama
        runs: dict = {name: [] for name in methods}
        for fn in methods.values():
            fn(prompts[0][:16])  # warm-up
        # question by question, every method in turn: drift in the machine's speed hits all alike
        for ids in tqdm(prompts, desc="spec-bench", unit="q"):
            for name, fn in methods.items():
                runs[name].append(fn(ids))
    results = _summarize(path.name, max_new_tokens, questions, runs)
    return _emit(results, _print_spec_bench, _plot_spec_bench, json_path, plot_path)


def _ours(llm, drafter, max_new_tokens: int):
    def run(ids):
        t0 = time.perf_counter()
        c = llm.generate(ids, drafter=drafter, max_tokens=max_new_tokens)
        return {
            "tokens": c.token_ids,
            "seconds": time.perf_counter() - t0,
            "forwards": c.stats.work.target_forwards,
            "consumed": c.stats.work.consumed,
        }

    return run


def _hf_methods(path: Path, draft: str | None, max_new_tokens: int, device: str | None) -> dict:
    """transformers' generate, plain and with its own speculative options, forwards counted by a hook."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def hf_load(p: Path):
        kw = dict(gguf_file=p.name) if p.is_file() else {}
        return (
            AutoModelForCausalLM.from_pretrained(str(p.parent if p.is_file() else p), dtype=torch.float32, **kw)
            .to(dev)
            .eval()
        )

    model = hf_load(path)
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])

    def make(**kw):
        @torch.inference_mode()
        def run(ids):
            x = torch.tensor([ids], device=dev)
            calls[0] = 0
            t0 = time.perf_counter()
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=next(iter(eos), 0),
                **kw,
            )
            seconds = time.perf_counter() - t0
            new = out[0, len(ids) :].tolist()
            kept = [t for t in new if t not in eos]
            return {
                "tokens": kept,
                "seconds": seconds,
                "forwards": calls[0],
                "consumed": len(kept) + (len(kept) < len(new)),
            }

        return run

    methods = {"hf-plain": make(), "hf-prompt-lookup": make(prompt_lookup_num_tokens=10)}
    if draft:
        assistant = hf_load(Path(draft))
        if (Path(draft) / "config.json").is_file() and "gearshift_shared" in json.loads(
            (Path(draft) / "config.json").read_text()
        ):
            # a gearshift distill draft stores no embeddings or LM head: they are the target's
            assistant.set_input_embeddings(model.get_input_embeddings())
            assistant.set_output_embeddings(model.get_output_embeddings())
        methods["hf-assisted"] = make(assistant_model=assistant)
    return methods


def _summarize(model: str, max_new_tokens: int, questions: list[dict], runs: dict) -> dict:
    groups = sorted({q["group"] for q in questions}, key=list(dict.fromkeys(q["group"] for q in questions)).index)

    def rate(name, idx):
        return sum(len(runs[name][i]["tokens"]) for i in idx) / sum(runs[name][i]["seconds"] for i in idx)

    def mat(name, idx):
        return sum(runs[name][i]["consumed"] for i in idx) / max(1, sum(runs[name][i]["forwards"] for i in idx))

    every = range(len(questions))
    by_group = {g: [i for i, q in enumerate(questions) if q["group"] == g] for g in groups}
    out = {"model": model, "max_new_tokens": max_new_tokens, "questions": len(questions), "methods": {}}
    for name in runs:
        reference = "hf-plain" if name.startswith("hf-") else name if name == "llama.cpp" else "plain"
        mismatches = [
            questions[i]["question_id"] for i in every if runs[name][i]["tokens"] != runs[reference][i]["tokens"]
        ]
        out["methods"][name] = {
            "tok_per_s": rate(name, every),
            "speedup": rate(name, every) / rate("plain", every),
            "mat": mat(name, every),
            "identical_to_plain": not mismatches,
            "mismatched_questions": mismatches,
            "compared_with": reference,
            "lossless": True,  # every method here is lossless by construction
            "per_category": {
                g: {"speedup": rate(name, idx) / rate("plain", idx), "mat": mat(name, idx)}
                for g, idx in by_group.items()
            },
        }
        if "llama.cpp" in runs:
            out["methods"][name]["vs_llama_cpp"] = rate(name, every) / rate("llama.cpp", every)
    return out


def _print_spec_bench(r: dict) -> None:
    methods = r["methods"]
    groups = list(next(iter(methods.values()))["per_category"])
    print(
        f"\nSpec-Bench on {r['model']}: {r['questions']} questions, greedy, {r['max_new_tokens']} new tokens; "
        "speedup vs our plain decoding"
    )
    head = f"{'method':<18}" + "".join(f"{g[:13]:>14}" for g in groups) + f"{'overall':>9}{'MAT':>6}{'tok/s':>8}  same"
    print(head)
    for name, m in methods.items():
        cells = "".join(f"{m['per_category'][g]['speedup']:>13.2f}x" for g in groups)
        same = "yes" if m["identical_to_plain"] else f"NO ({len(m['mismatched_questions'])} differ)"
        vs = f"  {m['vs_llama_cpp']:.2f}x llama.cpp" if "vs_llama_cpp" in m else ""
        print(f"{name:<18}{cells}{m['speedup']:>8.2f}x{m['mat']:>6.2f}{m['tok_per_s']:>8.1f}  {same}{vs}")


def _plot_spec_bench(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in r["methods"] if m != "plain"]
    groups = list(r["methods"]["plain"]["per_category"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4))
    width = 0.8 / max(1, len(methods))
    for j, name in enumerate(methods):
        m = r["methods"][name]
        vals = [m["per_category"][g]["speedup"] for g in groups[:-1]] + [m["speedup"]]
        ax.bar(np.arange(len(groups)) + j * width, vals, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2, groups, rotation=20)
    ax.set_ylabel("speedup vs plain decoding")
    ax.set_title(f"Spec-Bench, {r['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- entropy-adaptive decoding

EAD_TAUS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 100.0)  # nats; 0 = the large model only, 100 = the small only
EAD_QUESTIONS = 20  # taken from the end of GSM8K's train file: `gearshift distill` trains on its start


def gsm8k_eval(n: int) -> list[dict]:
    return read_jsonl(data_dir() / "gsm8k" / "train.jsonl")[-n:]


def final_number(text: str) -> str | None:
    """The last number in a text, commas dropped: GSM8K's answer convention."""
    import re

    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def rouge_l(a: list[int], b: list[int]) -> float:
    """F1 of the longest common subsequence of two token sequences."""
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 2 * lcs / (len(a) + len(b))


@torch.inference_mode()
def mean_loglik(llm, prompt: list[int], output: list[int]) -> float:
    """The large model's mean log-probability of `output` after `prompt`, in nats per token."""
    if not output:
        return 0.0
    ids = prompt + output
    logits = llm.model.run(ids, llm.model.new_cache(1, len(ids)), logits_from=len(prompt) - 1)[:-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(1, torch.tensor(output, device=llm.device)[:, None]).mean())


def run_ead(
    model: str | None,
    small: str = "early-exit",
    taus=EAD_TAUS,
    n_questions: int = EAD_QUESTIONS,
    max_new_tokens: int = 128,
    window: int = 5,
    min_run: int = 4,
    verify: bool = False,
    json_path: str | None = None,
    plot_path: str | None = None,
    device: str | None = None,
) -> dict:
    """Sweep tau: cost (large-model share, compute, tokens/s) against quality, each relative to the
    large model's own greedy answer. quality_retained is the loglik ratio (see the README).
    `verify` also runs ead+verify at each tau: the same schedule, lossless, so only its cost varies."""
    llm = LLM(load(hub.resolve_model(model), device=device), prefix_cache=False)
    rows = gsm8k_eval(n_questions)
    prompts = [llm.encode([{"role": "user", "content": r["question"]}]) for r in rows]
    answers = [final_number(r["answer"].split("####")[-1]) for r in rows]
    llm.generate(prompts[0][:16], max_tokens=4)  # warm-up
    ref = [llm.generate(ids, max_tokens=max_new_tokens) for ids in tqdm(prompts, desc="large model, greedy", unit="q")]
    ref_ll = [mean_loglik(llm, ids, c.token_ids) for ids, c in zip(prompts, ref)]

    def cost(outs) -> dict:
        large = sum(c.stats.ead.large_tokens for c in outs)
        made = sum(c.stats.ead.large_tokens + c.stats.ead.small_tokens for c in outs)
        seconds = sum(
            c.stats.timing.prefill_s + c.stats.timing.decode_s for c in outs
        )  # the prompt read in, as ead does
        return {
            "large_fraction": large / made,
            "tok_per_s": sum(len(c.token_ids) for c in outs) / seconds,
            "relative_compute": sum(c.stats.ead.flops for c in outs) / sum(c.stats.ead.large_only_flops for c in outs),
        }

    points = []
    for tau in tqdm(taus, desc="ead sweep", unit="tau"):
        cfg = EAD(small=small, tau=tau, window=window, min_run=min_run)
        outs = [llm.generate(ids, ead=cfg, max_tokens=max_new_tokens) for ids in prompts]
        lls = [mean_loglik(llm, ids, c.token_ids) for ids, c in zip(prompts, outs)]
        ratios = [math.exp(a - b) for a, b in zip(lls, ref_ll)]
        points.append(
            {
                "tau": tau,
                **cost(outs),
                # capped per question: text the large model likes better than its own greedy answer
                # (repetition often is) does not make up for a question where quality was lost
                "quality_retained": sum(min(1.0, x) for x in ratios) / len(ratios),
                "loglik_ratio": sum(ratios) / len(ratios),
                "agreement": sum(
                    sum(x == y for x, y in zip(c.token_ids, r.token_ids)) / max(1, len(r.token_ids))
                    for c, r in zip(outs, ref)
                )
                / len(outs),
                "rouge_l": sum(rouge_l(c.token_ids, r.token_ids) for c, r in zip(outs, ref)) / len(outs),
                "exact_match": sum(final_number(c.text) == a for c, a in zip(outs, answers)) / len(outs),
            }
        )
        if verify:
            cfg = EAD(small=small, tau=tau, window=window, min_run=min_run, verify=True)
            outs = [llm.generate(ids, ead=cfg, max_tokens=max_new_tokens) for ids in prompts]
            points[-1]["verify"] = {
                **cost(outs),
                "identical": all(c.token_ids == r.token_ids for c, r in zip(outs, ref)),
            }
    results = {
        "large": llm.loaded.path.name,
        "small": small,
        "questions": len(prompts),
        "max_new_tokens": max_new_tokens,
        "window": window,
        "min_run": min_run,
        "large_only_exact_match": sum(final_number(c.text) == a for c, a in zip(ref, answers)) / len(ref),
        "points": points,
    }
    return _emit(results, _print_ead, _plot_ead, json_path, plot_path)


def _print_ead(r: dict) -> None:
    print(
        f"\nEntropy-adaptive decoding: large {r['large']}, small {r['small']}, {r['questions']} GSM8K questions "
        f"(large-only exact match {r['large_only_exact_match']:.2f})"
    )
    print(f"{'tau':>6}{'large %':>9}{'compute':>9}{'tok/s':>8}{'quality':>9}{'agree':>7}{'rougeL':>8}{'EM':>6}")
    for p in r["points"]:
        print(
            f"{p['tau']:>6.1f}{100 * p['large_fraction']:>8.1f}%{p['relative_compute']:>9.2f}{p['tok_per_s']:>8.1f}"
            f"{p['quality_retained']:>9.3f}{p['agreement']:>7.2f}{p['rouge_l']:>8.2f}{p['exact_match']:>6.2f}"
        )
    if all("verify" in p for p in r["points"]):
        print("\nead+verify (lossless: the large model verifies the small one's tokens)")
        print(f"{'tau':>6}{'large %':>9}{'compute':>9}{'tok/s':>8}  same as large greedy")
        for p in r["points"]:
            v = p["verify"]
            print(
                f"{p['tau']:>6.1f}{100 * v['large_fraction']:>8.1f}%{v['relative_compute']:>9.2f}"
                f"{v['tok_per_s']:>8.1f}  {'yes' if v['identical'] else 'NO'}"
            )


def _plot_ead(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(r["points"], key=lambda p: p["large_fraction"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [100 * p["large_fraction"] for p in pts]
    ax.plot(x, [p["quality_retained"] for p in pts], "o-", label="quality retained (loglik ratio)")
    ax.plot(x, [p["rouge_l"] for p in pts], "s--", label="ROUGE-L vs large greedy", alpha=0.7)
    ax.plot(x, [p["relative_compute"] for p in pts], "^:", label="relative compute", alpha=0.7)
    for p, xi in zip(pts, x):
        ax.annotate(
            f"τ={p['tau']:g}", (xi, p["quality_retained"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    lossless = [p["verify"] for p in pts if p.get("verify", {}).get("identical")]
    if lossless:  # its output is the large model's: quality 1 by construction, checked per point
        ax.plot(
            [100 * v["large_fraction"] for v in lossless],
            [1.0] * len(lossless),
            "D",
            color="tab:purple",
            label="ead+verify (lossless)",
            alpha=0.7,
        )
    ax.axhline(0.95, color="grey", linewidth=0.6)
    ax.axvline(40, color="grey", linewidth=0.6)
    ax.set_xlabel("tokens written by the large model (%)")
    ax.set_ylabel("relative to the large model alone")
    ax.set_title(f"EAD: {r['small']} + {r['large']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
