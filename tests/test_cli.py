"""The command line as a user runs it: real processes, real files, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from gearshift import hub


def run(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gearshift", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gearshift: error:"), proc.stderr
    assert pattern in lines[0]


@pytest.fixture(scope="module")
def default_model() -> Path:
    return hub.pull()


def test_generate_streams_and_reports_speed(default_model):
    p = run("generate", "What is 2 + 2?", "--max-tokens", "20")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "tok/s" in p.stderr


def test_chat_keeps_the_conversation(default_model):
    p = run("chat", "--max-tokens", "20", stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("tok/s") == 2
    assert "Ada" in p.stdout


def test_info_json(default_model):
    p = run("info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["file_quantization"] == "Q4_1"
    assert 130e6 < info["parameters"] < 140e6


def test_pull_is_idempotent_and_verified(default_model):
    before = default_model.stat().st_mtime_ns
    p = run("pull")
    assert p.returncode == 0 and Path(p.stdout.strip()) == default_model
    assert default_model.stat().st_mtime_ns == before
    assert hub.sha256_file(default_model) == hub.DEFAULT_SHA256
    assert not list(default_model.parent.glob(".pull-*"))


def test_missing_file():
    assert_one_line_error(run("generate", "hi", "--model", "/no/such/model.gguf"), "model not found")


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a model" * 100)
    assert_one_line_error(run("generate", "hi", "--model", str(f)), "not a GGUF file")


def test_truncated_gguf(tmp_path, default_model):
    f = tmp_path / "cut.gguf"
    with open(default_model, "rb") as src:
        f.write_bytes(src.read(5_000_000))
    assert_one_line_error(run("generate", "hi", "--model", str(f)), "truncated or corrupt")


def test_unsupported_architecture_gguf(tmp_path):
    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run("info", str(f)), "unsupported architecture 'gpt2'")


def test_unsupported_architecture_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_one_line_error(run("info", str(tmp_path)), "unsupported architecture 'bert'")


def test_prompt_longer_than_context(default_model):
    assert_one_line_error(run("generate", "word " * 9000, "--raw"), "context window is 8192")


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-5"], "top_k"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--weights", "int3"], "unknown weight format"),
    ],
)
def test_invalid_parameters(default_model, args, pattern):
    assert_one_line_error(run("generate", "hi", *args), pattern)


def test_generate_with_drafter_matches_plain(default_model):
    plain = run("generate", "Repeat: red green blue, red green blue.", "--max-tokens", "24")
    spec = run("generate", "Repeat: red green blue, red green blue.", "--max-tokens", "24", "--drafter", "lookup")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "MAT" in spec.stderr


def test_recycling_matrix_is_saved_and_warm_starts(default_model, tmp_path):
    matrix = tmp_path / "recycling.npy"
    prompt = ["generate", "Count: one, two, three, four, five, six.", "--max-tokens", "24"]
    plain = run(*prompt)
    first = run(*prompt, "--drafter", f"recycling:{matrix}")
    assert first.returncode == 0, first.stderr
    adjacency = np.load(matrix)
    assert adjacency.shape == (49152, 8) and (adjacency[:, 0] >= 0).sum() >= 24  # a row per verified token
    second = run(*prompt, "--drafter", f"recycling:{matrix}")
    assert first.stdout == second.stdout == plain.stdout
    assert (np.load(matrix) >= 0).sum() >= (adjacency >= 0).sum()  # loaded, then grown, not restarted
    matrix.write_bytes(b"not a matrix")
    assert_one_line_error(run(*prompt, "--drafter", f"recycling:{matrix}"), "cannot read the recycling matrix")


def test_unknown_drafter_is_a_one_line_error(default_model):
    assert_one_line_error(run("generate", "hi", "--drafter", "oracle"), "unknown drafter")


def test_unsupported_rope_scaling_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )
    )
    assert_one_line_error(run("info", str(tmp_path)), "unsupported RoPE scaling 'yarn'")


def test_bench_batch_and_multiturn_write_json_and_plots(default_model, tmp_path):
    from PIL import Image

    out, png = tmp_path / "batch.json", tmp_path / "batch.png"
    p = run(
        "bench",
        "batch",
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--max-tokens",
        "6",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    keys = {"tok_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"}
    assert set(r["levels"]) == {"1", "2"} and all(keys <= set(v) for v in r["levels"].values())
    assert r["relative_to_1"]["1"] == 1.0 and r["relative_to_1"]["2"] > 0
    assert r["levels"]["2"]["identical_to_1"] == 1.0  # batching changed no answer
    assert Image.open(png).size[0] > 0
    out, png = tmp_path / "turns.json", tmp_path / "turns.png"
    p = run(
        "bench",
        "multiturn",
        "--chats",
        "1",
        "--turns",
        "3",
        "--max-tokens",
        "6",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert p.returncode == 0, p.stderr
    turns = json.loads(out.read_text())["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert all({"ttft_cached_s", "ttft_cold_s", "cached_tokens"} <= set(t) for t in turns)
    assert turns[2]["cached_tokens"] > turns[1]["cached_tokens"] > 0 and all(t["same_first_token"] for t in turns)
    assert Image.open(png).size[0] > 0
    assert_one_line_error(run("bench", "batch", "--concurrency", "0,2"), "--concurrency")
    assert_one_line_error(run("bench", "multiturn", "--turns", "0"), "--turns")


def test_llama_cpp_flags_turn_amx_off_and_avx512_on_only_where_reported():
    from gearshift.tools.llama_cpp import cmake_flags

    avx2 = cmake_flags({"avx2", "fma", "f16c", "amx_tile", "amx_bf16"})
    assert "-DGGML_AMX_TILE=OFF" in avx2 and "-DGGML_NATIVE=OFF" in avx2
    assert not any("AVX512" in f for f in avx2)
    avx512 = cmake_flags({"avx2", "avx512f", "avx512_vnni"})
    assert "-DGGML_AVX512=ON" in avx512 and "-DGGML_AVX512_VNNI=ON" in avx512 and "-DGGML_AVX512_BF16=ON" not in avx512


def test_bench_with_a_missing_llama_cpp_dir_is_a_one_line_error(tmp_path):
    assert_one_line_error(
        run("bench", "--quick", "--llama-cpp", str(tmp_path / "nowhere")), "no llama.cpp binaries under"
    )


LLAMA_CPP = __import__("gearshift.tools.llama_cpp", fromlist=["default_dir"]).default_dir()  # the user's, at collection


@pytest.mark.skipif(not (LLAMA_CPP / "bin" / "llama-server").is_file(), reason="llama.cpp not built (build-llama-cpp)")
def test_llama_server_anchor_completes_greedily_and_stops(llm):
    """The llama.cpp row of the benchmarks: the real server on loopback, same GGUF file; greedy is
    deterministic, and the server is gone after the block."""
    from gearshift.tools.llama_cpp import Server

    ids = llm.tokenizer.encode("The capital of France is")
    with Server(llm.loaded.path, threads=2, prefix=LLAMA_CPP) as server:
        a, b = server.complete(ids, 16), server.complete(ids, 16)
        assert len(a["tokens"]) == 16 and a["tokens"] == b["tokens"]
        proc = server.proc
    assert proc.poll() is not None


def test_build_llama_cpp_with_bad_jobs_is_a_one_line_error():
    assert_one_line_error(run("build-llama-cpp", "--jobs", "0"), "--jobs must be a positive integer")


def test_serve_refuses_bad_settings_before_loading():
    assert_one_line_error(run("serve", "--speculative-config", "{bad"), "--speculative-config is not valid JSON")
    assert_one_line_error(run("serve", "--speculative-config", '{"method": "magic"}'), "method 'magic' is unknown")
    assert_one_line_error(run("serve", "--max-num-seqs", "0"), "max_num_seqs must be a positive integer")
    assert_one_line_error(run("serve", "--port", "70000"), "--port must be from 1 to 65535")
    assert_one_line_error(run("bench", "serve"), "bench serve needs --url URL or --compare-llama-cpp")
    assert_one_line_error(run("bench", "serve", "--url", "localhost:8000"), "--url must start with http://")


def test_serve_command_answers_the_openai_client_and_stops_on_sigint(default_model):
    """`gearshift serve` as a user starts it: a real process on loopback, the openai client, Ctrl-C."""
    import signal
    import time
    import urllib.request

    import openai

    from gearshift.tools.llama_cpp import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gearshift",
            "serve",
            "--port",
            str(port),
            "--max-num-seqs",
            "2",
            "--max-model-len",
            "1024",
            "--speculative-config",
            '{"method": "ngram"}',
            "--served-model-name",
            "tiny-chat",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "server never became ready"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content and r.model_extra["gearshift"]["strategy"] == "lookup"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.skipif(not (LLAMA_CPP / "bin" / "llama-server").is_file(), reason="llama.cpp not built (build-llama-cpp)")
def test_bench_serve_compares_with_llama_server(tmp_path):
    out = tmp_path / "serve.json"
    p = run(
        "bench",
        "serve",
        "--compare-llama-cpp",
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--max-tokens",
        "8",
        "--max-num-seqs",
        "2",
        "--llama-cpp",
        str(LLAMA_CPP),
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    for name in ("gearshift", "llama.cpp"):
        s = r["servers"][name]["2"]
        assert s["errors"] == 0 and s["requests"] == 2 and s["output_tok_per_s"] > 0
    assert "-np 2" in r["commands"]["llama.cpp"] and "--max-num-seqs 2" in r["commands"]["gearshift"]
    assert r["ratio_vs_llama_cpp"]["2"]["output_tok_per_s"] > 0


def test_pull_gemma_by_name_into_a_fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEARSHIFT_HOME", str(tmp_path))  # run() passes os.environ on
    p = run("pull", "gemma-3-270m")
    assert p.returncode == 0, p.stderr
    path = Path(p.stdout.strip())
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert "https://ai.google.dev/gemma/terms" in p.stderr
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert hub.sha256_file(path) == hub.known_model("gemma-3-270m").sha256
    assert [q.name for q in path.parent.iterdir()] == [path.name]  # no .pull-* or .part left behind
    before = path.stat().st_mtime_ns
    assert hub.resolve_model("gemma-3-270m") == path  # the name works wherever --model does, no re-download
    assert hub.resolve_model("gemma-3-270m-q4_k_m.gguf") == path
    assert path.stat().st_mtime_ns == before
    again = run("pull", "gemma-3-270m")  # cached: still one line about the terms
    assert again.returncode == 0 and Path(again.stdout.strip()) == path
    assert again.stderr.count("ai.google.dev/gemma/terms") == 1


def test_pull_unknown_model(tmp_path, monkeypatch):
    monkeypatch.setenv("GEARSHIFT_HOME", str(tmp_path))
    assert_one_line_error(run("pull", "no-such-model"), "known models: smollm2-135m-instruct (default), gemma-3-270m")
    assert not (tmp_path / "models").exists()
