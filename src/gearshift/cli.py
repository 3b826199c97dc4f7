"""The `gearshift` command line: pull, generate, chat, info, bench."""

from __future__ import annotations

import argparse
import json
import sys


from .errors import GearshiftError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--weights", default="auto",
                   help="weight format: auto (GGUF 4-bit -> int4, 8-bit -> int8, float -> float32; bf16 on CUDA), "
                        "float32 (matches transformers), bfloat16, float16, int8, int4")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--drafter", default=None,
                   help="speculative decoding (lossless): lookup, early-exit[:L], model:PATH, recycling[:PATH] "
                        "(the matrix is loaded from and saved to PATH), suffix[:CORPUS], hybrid, or auto")


def _sampling(a: argparse.Namespace) -> dict:
    """The sampling options, validated before any model is loaded."""
    from .sampling import SamplingParams
    params = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed, stop=a.stop)
    SamplingParams(**params)
    return params


def _load(a: argparse.Namespace):
    from .engine import load
    return load(a.model, device=a.device, weights=a.weights)


def _stats(c) -> str:
    m = c.metrics
    spec = f", MAT {m['mat']:.2f}, acceptance {m['acceptance_rate']:.0%}" if "proposed" in m else ""
    return (f"[{m['generated_tokens']} tokens, {m['tok_per_s']:.1f} tok/s{spec}, "
            f"prefill {m['prefill_s'] * 1000:.0f} ms, finish: {c.finish_reason}]")


def cmd_pull(a) -> None:
    from .hub import pull
    print(pull(force=a.force))


def cmd_generate(a) -> None:
    params = _sampling(a)
    llm = _load(a)
    prompt = a.prompt if a.raw or not llm.tokenizer.chat_template else \
        ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    drafter = llm.drafter(a.drafter)
    for delta in llm.stream(prompt, drafter=drafter, **params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _save_drafter(drafter)
    print(_stats(llm.last), file=sys.stderr)


def _save_drafter(drafter) -> None:
    """Keep what a learning drafter (recycling:PATH) learned, for the next run to start warm."""
    from .drafters import TreeDrafter
    if isinstance(drafter, TreeDrafter):
        drafter.save()


def cmd_chat(a) -> None:
    params = _sampling(a)
    llm = _load(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    drafter = llm.drafter(a.drafter)
    print("gearshift chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        for delta in llm.stream(messages, drafter=drafter, **params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _save_drafter(drafter)
        print(_stats(llm.last), file=sys.stderr)
        messages.append({"role": "assistant", "content": llm.last.text})


def cmd_info(a) -> None:
    from .loading import load
    loaded = load(a.model_path or a.model, device=a.device, weights=a.weights)
    m, cfg = loaded.model, loaded.model.cfg
    weight_bytes = sum(b.nbytes for b in m.buffers())
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * m.dtype.itemsize
    info = {
        "path": str(loaded.path), "architecture": cfg.arch, "parameters": cfg.n_params(),
        "layers": cfg.n_layers, "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
        "vocab": cfg.vocab_size, "context": cfg.max_seq_len, "tied_embeddings": cfg.tie_embeddings,
        "file_quantization": loaded.quantization, "runtime_weights": m.fmts, "compute_dtype": str(m.dtype),
        "device": str(m.device), "weight_memory_mb": round(weight_bytes / 2**20, 1),
        "kv_cache_kb_per_token": round(kv_per_token / 1024, 1), "load_seconds": round(loaded.load_seconds, 2),
        "conversion_cache": "hit" if loaded.cached else "miss",
    }
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")


def cmd_bench(a) -> None:
    from .bench import run_quick, run_spec_bench
    if a.suite == "spec-bench":
        run_spec_bench(a.model, per_category=a.limit_per_category, max_new_tokens=a.max_tokens, draft=a.draft,
                       drafters=a.drafter, json_path=a.json, plot_path=a.plot,
                       with_transformers=not a.no_transformers, device=a.device)
    elif a.quick:
        run_quick(a.model, n_questions=a.limit, max_new_tokens=a.max_tokens, json_path=a.json, plot_path=a.plot,
                  with_transformers=not a.no_transformers, device=a.device)
    else:
        raise GearshiftError("choose a benchmark: gearshift bench --quick, or gearshift bench spec-bench")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gearshift", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="download the default model into the cache")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("generate", help="stream a completion for one prompt")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--system", default=None, help="system message")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    p.add_argument("--system", default=None)
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("info", help="architecture, parameter count, quantization, memory")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="measure decoding speed against transformers")
    p.add_argument("suite", nargs="?", choices=["spec-bench"], help="spec-bench: every drafter, per category")
    p.add_argument("--quick", action="store_true", help="first 10 Spec-Bench questions, 128 new tokens")
    p.add_argument("--limit-per-category", type=int, default=2)
    p.add_argument("--draft", default=None, help="draft model for model:PATH and transformers' assistant_model")
    p.add_argument("--drafter", action="append", default=None,
                   help="drafters to run (default: lookup, early-exit, recycling, suffix, hybrid)")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="draw tokens/s per engine to this PNG")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GearshiftError as e:
        print(f"gearshift: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
