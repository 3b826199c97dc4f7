"""Distilled drafts and entropy-adaptive decoding, on tiny models and on the default model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from gearshift import LLM
from gearshift.ead import EAD, Schedule
from gearshift.errors import GearshiftError
from gearshift.loading import load, load_exit_head, read_checkpoint
from gearshift.model import ExitHead
from gearshift.sampling import entropy
from gearshift.strategies import make_drafter as build_drafter
from gearshift.tools.distill import (
    TASK_OPENERS,
    DistillConfig,
    distill,
    distill_loss,
    exit_loss,
    export,
    self_prompts,
    student_from_target,
    training_prompts,
)
from tiny import VOCAB, tiny_model_dir


def make_drafter(spec: str, llm: LLM):
    return build_drafter(spec, llm.model, llm.tokenizer, llm.loaded.path)


def cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "gearshift", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ead")
    large = LLM(
        load(tiny_model_dir(root / "large", 3, seed=11, head_scale=0.5), weights="int8", device="cpu", use_cache=False)
    )
    small_dir = tiny_model_dir(root / "small", 1, seed=12, head_scale=0.5)
    return large, small_dir


def test_schedule_switches_on_the_rolling_mean_and_holds_min_run():
    s = Schedule(EAD(tau=1.0, window=2, min_run=2))
    modes = []
    for h in [0.2, 0.2, 3.0, 3.0, 0.1, 0.1, 0.1, 0.1]:
        s.push(h)
        modes.append(s.large)
    # mean of the last 2 crosses 1.0 at the 3rd value (min run of 2 already met): large; it falls
    # back under at the 6th, but the large run must last 2 tokens from the 4th on: small at the 6th
    assert modes == [False, False, True, True, True, False, False, False]
    assert Schedule(EAD(tau=0.0)).large  # tau 0: the large model throughout


def test_ead_extremes_are_the_two_models_and_verify_is_lossless(pair):
    large, small_dir = pair
    small = LLM(load(small_dir, weights="int8", device="cpu", use_cache=False))  # as ead loads it
    spec = f"model:{small_dir}"
    for prompt in ([1, 2, 3], [4, 4, 5, 6, 1, 2]):
        ref = large.generate(prompt, max_tokens=24, ignore_eos=True)
        only_large = large.generate(prompt, ead=EAD(small=spec, tau=0.0), max_tokens=24, ignore_eos=True)
        assert only_large.token_ids == ref.token_ids
        assert only_large.metrics["large_fraction"] == 1.0 and only_large.metrics["relative_compute"] == 1.0
        only_small = large.generate(prompt, ead=EAD(small=spec, tau=100.0), max_tokens=24, ignore_eos=True)
        assert only_small.token_ids == small.generate(prompt, max_tokens=24, ignore_eos=True).token_ids
        assert only_small.metrics["large_fraction"] == 0.0 and only_small.metrics["relative_compute"] < 0.6
        # a tau inside the range of the entropies the models see splits the work between them
        ids = prompt + only_small.token_ids
        with torch.inference_mode():
            logits = small.model.run(ids, small.model.new_cache(1, 64), logits_from=len(prompt) - 1)
        tau = sorted(entropy(row) for row in logits)[len(logits) // 2]
        mixed = large.generate(
            prompt, ead=EAD(small=spec, tau=tau, window=1, min_run=1), max_tokens=24, ignore_eos=True
        )
        assert 0 < mixed.metrics["large_fraction"] < 1
        assert only_small.metrics["relative_compute"] < mixed.metrics["relative_compute"] < 1.5
        for tau in (0.0, tau, 0.5, 1.0, 2.0, 100.0):
            verified = large.generate(prompt, ead=EAD(small=spec, tau=tau, verify=True), max_tokens=24, ignore_eos=True)
            assert verified.token_ids == ref.token_ids
            m = verified.metrics  # the small model produced what the large one accepted of its drafts
            assert m["small_tokens"] == m["accepted"] and m["large_tokens"] + m["small_tokens"] == 24
            if tau == 0.0:
                assert m["large_fraction"] == 1.0 and m["relative_compute"] == 1.0
            if tau == 100.0:  # both models read every token, the large one whole drafts: more than large-only
                assert m["small_tokens"] > 0 and m["relative_compute"] > 1.0
    with pytest.raises(GearshiftError):
        large.generate([1], ead=EAD(small="lookup"))
    with pytest.raises(GearshiftError):
        large.generate([1], drafter="lookup", ead=EAD(small=spec))


def test_export_round_trips_and_stores_only_unshared_weights(pair, tmp_path):
    large, _ = pair
    ck = read_checkpoint(large.loaded.path)
    export(student_from_target(ck, [0, 1, 2]), ck, large.loaded.path, large.tokenizer, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert json.loads((tmp_path / "config.json").read_text())["gearshift_shared"]["base"] == str(large.loaded.path)
    a = load(tmp_path, weights="float32", device="cpu", use_cache=False).model
    b = load(large.loaded.path, weights="float32", device="cpu", use_cache=False).model
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        la, lb = a.run(x[0], a.new_cache(1, 16)), b.run(x[0], b.new_cache(1, 16))
    assert (la - lb).abs().max() < 0.02 * lb.abs().max()  # the weights went through bfloat16


def test_distill_trains_resumes_and_drafts_losslessly(pair, tmp_path):
    large, _ = pair
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(chr(97 + int(t)) for t in torch.randint(0, VOCAB, (6,), generator=g)) for _ in range(24)]
    cfg = DistillConfig(
        out=tmp_path / "draft",
        layers=[0],
        prompts=prompts,
        max_new_tokens=16,
        gen_batch=8,
        batch_tokens=96,
        steps=20,
        save_every=10,
        lr=3e-3,
    )
    first = distill(large, cfg)
    assert first["steps"] == 20 and first["answers"] == 24
    data = torch.load(cfg.out / "data.pt")
    assert len(data) == 24 and all(len(x["top_indices"]) == 16 for x in data)  # the target's own answers
    cfg.steps = 60  # resume: the data is reused and training goes on from step 20
    stamp = (cfg.out / "data.pt").stat().st_mtime_ns
    second = distill(large, cfg)
    assert second["steps"] == 60 and (cfg.out / "data.pt").stat().st_mtime_ns == stamp
    history = torch.load(cfg.out / "checkpoint.pt", weights_only=False)["history"]
    assert len(history) == 60
    ck = read_checkpoint(large.loaded.path)
    before = student_from_target(ck, [0])
    after = load(cfg.out, weights="float32", device="cpu", use_cache=False).model
    with torch.no_grad():
        assert distill_loss(after, data) < distill_loss(before, data)  # it learned the target's distributions
    drafter = make_drafter(f"model:{cfg.out}", large)
    for prompt in prompts[:6]:
        ids = large.encode(prompt)
        assert (
            large.generate(ids, drafter=drafter, max_tokens=16, ignore_eos=True).token_ids
            == large.generate(ids, max_tokens=16, ignore_eos=True).token_ids
        )


def test_early_exit_head_trains_and_drafts_losslessly(pair, tmp_path):
    large, _ = pair
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(chr(97 + int(t)) for t in torch.randint(0, VOCAB, (5,), generator=g)) for _ in range(16)]
    cfg = DistillConfig(
        out=tmp_path / "exit",
        layers=[0],
        prompts=prompts,
        max_new_tokens=12,
        gen_batch=8,
        batch_tokens=64,
        steps=40,
        lr=1e-2,
    )
    summary = distill(large, cfg, early_exit=True, rank=4)
    assert summary["kind"] == "early-exit head"
    assert not (cfg.out / "model.safetensors").exists()  # nothing of the target is copied
    layers, head = load_exit_head(cfg.out, large.loaded.path, large.model)
    assert layers == 1 and sum(p.numel() for p in head.parameters()) == 2 * 4 * 64 + 64
    data = torch.load(cfg.out / "data.pt")
    ck = read_checkpoint(large.loaded.path)
    untrained = ExitHead(64, large.model.cfg.norm_eps, 4)
    with torch.no_grad():
        untrained.norm.weight.copy_(ck.tensors["model.norm.weight"])
        lm_head = ck.tensors["lm_head.weight"]
        assert exit_loss(large.model, 1, head, lm_head, data) < exit_loss(large.model, 1, untrained, lm_head, data)
    drafter = make_drafter(f"early-exit:{cfg.out}", large)
    for prompt in prompts[:6]:
        ids = large.encode(prompt)
        assert (
            large.generate(ids, drafter=drafter, max_tokens=12, ignore_eos=True).token_ids
            == large.generate(ids, max_tokens=12, ignore_eos=True).token_ids
        )
    other = LLM(load(tiny_model_dir(tmp_path / "other", 3, seed=5), device="cpu", use_cache=False))
    with pytest.raises(GearshiftError, match="was trained for"):
        make_drafter(f"early-exit:{cfg.out}", other)


def test_self_prompts_are_requests_the_target_writes_itself(llm):  # the default, chat-tuned model
    first = self_prompts(llm, 4, seed=3, max_tokens=48, batch=8)
    assert len(first) == 4 and len(set(first)) == 4 and all(len(q) >= 16 for q in first)
    assert self_prompts(llm, 4, seed=3, max_tokens=48, batch=8) == first  # seeded: a resumed run sees the same
    assert self_prompts(llm, 4, seed=4, max_tokens=48, batch=8) != first


def test_task_prompts_open_with_a_task_and_carry_text_the_target_wrote(llm, tmp_path):
    cfg = DistillConfig(out=tmp_path, layers=[], prompts=["What is 2 + 2?"], task_prompts=len(TASK_OPENERS))
    prompts = training_prompts(llm, cfg)
    assert prompts[0] == "What is 2 + 2?" and len(prompts) == 1 + len(TASK_OPENERS)
    # one per opener, interleaved, each with text after it
    assert [next(o for o in TASK_OPENERS if p.startswith(o)) for p in prompts[1:]] == list(TASK_OPENERS)
    assert all(len(p) >= len(o) + 16 for p, o in zip(prompts[1:], TASK_OPENERS))
    saved = (tmp_path / "task_prompts.json").read_text()
    assert training_prompts(llm, cfg) == prompts and (tmp_path / "task_prompts.json").read_text() == saved


def test_distill_cli_errors(pair, tmp_path):
    large, _ = pair
    p = cli("distill", "--out", str(tmp_path / "d"), "--layers", "1", "--every", "2", "--model", str(large.loaded.path))
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("gearshift: error:")
    assert "exactly one of" in p.stderr
    (tmp_path / "bad.jsonl").write_text("not json\n")
    p = cli(
        "distill",
        "--out",
        str(tmp_path / "d"),
        "--layers",
        "1",
        "--model",
        str(large.loaded.path),
        "--prompts-file",
        str(tmp_path / "bad.jsonl"),
    )
    assert p.returncode != 0 and "cannot read training prompts" in p.stderr and "Traceback" not in p.stderr
    p = cli(
        "distill",
        "--out",
        str(tmp_path / "d"),
        "--layers",
        "1",
        "--model",
        str(large.loaded.path),
        "--self-prompts",
        "-3",
    )
    assert p.returncode != 0 and "--self-prompts" in p.stderr and "Traceback" not in p.stderr
    p = cli("distill", "--out", str(tmp_path / "d"), "--layers", "1", "--model", str(large.loaded.path), "--steps", "0")
    assert p.returncode != 0 and "must be positive" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_generate_cli_with_ead():
    p = cli("generate", "What is 3 + 4?", "-n", "16", "--strategy", "ead+verify", "--small", "early-exit:4")
    q = cli("generate", "What is 3 + 4?", "-n", "16")
    assert p.returncode == 0, p.stderr
    assert p.stdout == q.stdout  # lossless
    bad = cli("generate", "hi", "--strategy", "ead", "--tau", "-1")
    assert bad.returncode != 0 and "tau" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_ead_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "ead.json", tmp_path / "ead.png"
    p = cli(
        "bench",
        "ead",
        "--limit",
        "2",
        "--taus",
        "0,1.5,100",
        "--max-tokens",
        "16",
        "--small",
        "early-exit:4",
        "--verify",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["small"] == "early-exit:4" and r["large"].endswith(".gguf")
    keys = {
        "tau",
        "large_fraction",
        "relative_compute",
        "tok_per_s",
        "quality_retained",
        "loglik_ratio",
        "agreement",
        "rouge_l",
        "exact_match",
    }
    assert [p["tau"] for p in r["points"]] == [0.0, 1.5, 100.0] and all(set(p) >= keys for p in r["points"])
    large_only, small_only = r["points"][0], r["points"][-1]
    assert large_only["large_fraction"] == 1.0 and large_only["quality_retained"] == pytest.approx(1.0)
    assert large_only["agreement"] == 1.0 and large_only["rouge_l"] == 1.0
    assert small_only["large_fraction"] == 0.0 and small_only["relative_compute"] < 1.0
    assert all(p["verify"]["identical"] for p in r["points"])  # ead+verify is lossless at every tau
    assert large_only["verify"]["large_fraction"] == 1.0 and small_only["verify"]["large_fraction"] < 1.0
    assert Image.open(png).size[0] > 0
    bad = cli("bench", "ead", "--window", "0")
    assert bad.returncode != 0 and "window" in bad.stderr and "Traceback" not in bad.stderr


def test_ead_large_only_is_plain_decoding_on_the_default_model(llm):
    """tau 0: the large model writes every token, each from the same one-row computation as plain
    decoding, so the output is plain greedy's token for token."""
    chats = [
        [{"role": "user", "content": q}]
        for q in (
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?",
            "Write a short poem about the sea.",
            "Explain what a hash table is.",
        )
    ]
    ead = llm.generate(chats, ead=EAD(small="early-exit:4", tau=0.0), max_tokens=96)
    assert [c.token_ids for c in ead] == [c.token_ids for c in llm.generate(chats, max_tokens=96)]
    assert all(c.metrics["large_fraction"] == 1.0 for c in ead)
