"""KV cache policies: each keeps what it says, positions stay right after entries are dropped, and a
budget that holds the whole sequence changes nothing."""

import math

import pytest
import torch

import gearshift
from gearshift import kernels, kv_policy
from gearshift.attention import Batch, Segment
from gearshift.errors import GearshiftError
from gearshift.kv_cache import KVCache, dequantize, quantize
from gearshift.kv_policy import KVPolicy, KVState
from tiny import tiny_model_dir

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey(n: int, key: int = 71432) -> list[dict]:
    text = FILLER * n + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * n
    return [{"role": "user", "content": text + "What is the pass key?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return gearshift.load(
        str(tiny_model_dir(tmp_path_factory.mktemp("kv") / "tiny", layers=2, seed=0)),
        weights="float32",
        max_model_len=64,
        max_num_seqs=2,
    )


def filled_cache(layers=2, kvh=2, n=40, d=8, seed=0) -> KVCache:
    c = KVCache(layers, 2, kvh, 128, d, torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    c.k[:, 0, :n] = torch.randn(layers, n, kvh, d, generator=g)
    c.v[:, 0, :n] = torch.randn(layers, n, kvh, d, generator=g)
    c.lengths[0] = n
    return c


# ------------------------------------------------------------------ each policy keeps what it says


def test_streaming_keeps_the_sinks_and_the_recent_window():
    c = filled_cache()
    c.inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    before = c.v[:, 0, :40].clone()
    state = KVState(KVPolicy("streaming", budget=12, sinks=4, window=8))
    assert kv_policy.compress(0, state, c, decoding=False)
    kept = list(range(4)) + list(range(32, 40))
    assert torch.equal(c.v[:, 0, :12], before[:, kept])  # (keys are re-rotated: the next test)
    assert c.lengths[0] == 12 and c.shift[0] == 28 and c.tokens(0) == 40
    assert (c.holes[:, 0, :, 0] == 12).all() and (c.holes[:, 0, :, 1] == 12).all()  # every head kept 12: no hole
    assert c.held(0) == 12 * 2 * 2


def test_snapkv_keeps_the_entries_the_window_attends():
    """Keys at positions 10 and 20 of head 0 are planted where the window's queries point."""
    c = filled_cache(layers=1, kvh=2, n=40, d=8)
    c.k[0, 0, :40] *= 0.01
    direction = torch.zeros(8)
    direction[3] = 1.0
    c.k[0, 0, 10, 0] = 8 * direction
    c.k[0, 0, 20, 0] = 8 * direction
    q = torch.zeros(4, 4, 8)  # 4 window rows, 4 query heads (2 per KV head)
    q[:, :2] = direction
    state = KVState(KVPolicy("snapkv", budget=8, sinks=2, window=4, pool=1))
    state.absorb([q], first=36)
    before = c.k[0, 0, :40].clone()
    kv_policy.compress(0, state, c, decoding=False)
    # head 0: sinks 0, 1; the planted 10, 20; the window 36..39 = 8 entries
    assert torch.equal(c.k[0, 0, :8, 0], before[[0, 1, 10, 20, 36, 37, 38, 39], 0])


def test_h2o_accumulates_the_attention_each_entry_received():
    c = filled_cache(layers=1, kvh=1, n=10, d=4)
    state = KVState(KVPolicy("h2o", budget=6, sinks=1, window=2, slack=1))
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(1, 2, 4, generator=g) for _ in range(3)]  # three decode rows, 2 query heads
    expected = torch.zeros(10)
    for i, q in enumerate(qs):
        n = 8 + i  # the row at slot position n - 1 sees positions 0..n-1
        c.lengths[0] = n
        kv_policy.accumulate(0, state, c, [q], first=n - 1)
        keys = c.k[0, 0, :n, 0]
        expected[:n] += torch.softmax(q[0] @ keys.T / math.sqrt(4), dim=-1).sum(0)
    assert torch.allclose(state.acc[0, 0, :10], expected, atol=1e-5)
    c.lengths[0] = 10
    order = expected.clone()
    order[:1] = order[8:] = math.inf  # the sink and the recent window stay
    keep = sorted(order.topk(6).indices.tolist())
    before = c.k[0, 0, :10].clone()
    kv_policy.compress(0, state, c, decoding=True)  # 10 > budget 6 + slack 1
    assert torch.equal(c.k[0, 0, :6], before[keep])
    assert torch.allclose(state.acc[0, 0, :6], expected[keep])  # the scores moved with their entries


def test_pyramid_budgets_shrink_with_depth_and_keep_the_total():
    b = KVPolicy("pyramid", budget=100, sinks=4, window=16).layer_budgets(5)
    assert b == sorted(b, reverse=True) and b[0] == 150 and b[-1] == 50 and sum(b) == 500


def test_bad_policies_are_one_line_errors(tiny):
    with pytest.raises(GearshiftError, match="unknown kv_policy"):
        tiny.generate("a b c", kv_policy="lru")
    with pytest.raises(GearshiftError, match="under sinks \\+ window"):
        tiny.generate("a b c", kv_policy="snapkv", kv_budget=8)
    with pytest.raises(GearshiftError, match="unknown kv_policy"):
        tiny.generate("a b c", kv_policy="snapkv+int3")
    with pytest.raises(GearshiftError, match="calibrate-duo"):  # no head file for this model
        tiny.generate("a b c", kv_policy="duo")


def test_duo_keeps_retrieval_heads_whole_and_streams_the_others(tmp_path):
    """A head file that names head 1 of layer 0 and head 0 of layer 1 the retrieval heads: they keep
    all 40 entries, the other heads their sinks and most recent entries only."""
    heads = tmp_path / "heads.json"
    heads.write_text('{"scores": [[0.01, 0.9], [0.5, 0.02]]}')
    c = filled_cache()
    before = c.k[:, 0, :40].clone()
    state = KVState(KVPolicy("duo", budget=12, sinks=4, window=8, heads=str(heads), retrieval=0.5))
    assert kv_policy.compress(0, state, c, decoding=False)
    streamed = list(range(4)) + list(range(32, 40))
    for layer, whole in ((0, 1), (1, 0)):
        assert torch.equal(c.k[layer, 0, :40, whole], before[layer, :, whole])
        assert torch.equal(c.k[layer, 0, :12, 1 - whole], before[layer, streamed, 1 - whole])
        assert c.holes[layer, 0, 1 - whole].tolist() == [12, 40] and c.holes[layer, 0, whole].tolist() == [40, 40]
    assert c.lengths[0] == 40 and c.held(0) == 2 * (40 + 12)
    c.lengths[0] = 40 + 70  # 70 decoded tokens later: the streaming heads are due again, the others untouched
    assert kv_policy.compress(0, state, c, decoding=True)
    assert c.held(0) == 2 * (110 + 12)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_kv_round_trips_within_its_stated_error(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 64, generator=g) * torch.rand(200, 3, 1, generator=g) * 10
    x[:, :, 5] += 30  # an outlier channel, as keys have
    codes, scales = quantize(x, fmt)
    err = (dequantize(codes, scales, fmt) - x).abs()
    if fmt == "int8":
        bound = x.abs().amax(-1, keepdim=True) / 254
    else:
        halves = x.view(200, 3, 2, 32)
        bound = ((halves.amax(-1) - halves.amin(-1)) / 30).repeat_interleave(32, -1)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert codes.dtype == torch.uint8 and err.max() > 0  # (it is lossy: the bound is what holds)


# ------------------------------------------------------------------ attention with dropped entries


def test_native_and_pytorch_attention_skip_the_same_holes(tiny, monkeypatch):
    """Per-head holes (head 0 kept 5 entries, head 1 kept 9): both implementations attend the same
    entries (and they differ from the uncompacted cache's result, so the holes matter)."""
    m = tiny.model
    cache = m.new_cache(1, 64)
    ids = [i % 8 for i in range(1, 21)]
    full = m.new_cache(1, 64)
    m.run(ids, full)
    m.run(ids, cache)
    kept = [[torch.tensor([0, 1, 17, 18, 19]), torch.tensor([0, 1, 2, 3, 15, 16, 17, 18, 19])]] * m.cfg.n_layers
    cache.compact(0, kept)
    assert cache.holes[0, 0].tolist() == [[5, 9], [9, 9]] and cache.shift[0] == 11
    out = {}
    for impl in ("native", "pytorch"):
        monkeypatch.setitem(kernels._state, "loaded", impl == "native")
        c = m.new_cache(1, 64)
        for name in ("k", "v"):
            getattr(c, name).copy_(getattr(cache, name))
        c.lengths, c.shift, c.compacted = list(cache.lengths), list(cache.shift), list(cache.compacted)
        c.holes.copy_(cache.holes)
        out[impl] = m.run([5, 6], c, logits_from=0)
    assert torch.allclose(out["native"], out["pytorch"], atol=1e-4)
    assert not torch.allclose(out["native"], m.run([5, 6], full, logits_from=0), atol=1e-3)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_native_and_pytorch_attention_read_the_same_quantized_entries(tiny, monkeypatch, fmt):
    """A quantized slot: both implementations read all but each row's `recent` last keys from the
    quantized copy (so the result differs from float32's), and with every key recent, it is float32's."""
    if not kernels._load():
        pytest.skip("no native kernels here")
    m = tiny.model
    ids = [i % 8 for i in range(1, 25)]
    prompt = {}
    for recent in (4, 64):  # the same quantized entries for both implementations: one prompt, copied
        prompt[recent] = m.new_cache(1, 64)
        prompt[recent].set_format(0, fmt, recent)
        m.run(ids, prompt[recent])
    out = {}
    for impl in ("native", "pytorch"):
        monkeypatch.setitem(kernels._state, "loaded", impl == "native")
        for recent in (4, 64):
            c = m.new_cache(1, 64)
            c.set_format(0, fmt, recent)
            for name in ("k", "v", "kq", "vq", "ks", "vs"):
                getattr(c, name).copy_(getattr(prompt[recent], name))
            c.lengths = list(prompt[recent].lengths)
            out[impl, recent] = m.run([5, 6, 7], c, logits_from=0)
            c = m.new_cache(1, 64)  # the same float32 entries, not quantized
            c.k.copy_(prompt[recent].k), c.v.copy_(prompt[recent].v)
            c.lengths = list(prompt[recent].lengths)
            out[impl, recent, "float32"] = m.run([5, 6, 7], c, logits_from=0)
    assert torch.allclose(out["native", 4], out["pytorch", 4], atol=1e-5)
    assert not torch.allclose(out["native", 4], out["native", 4, "float32"], atol=1e-4)
    for impl in ("native", "pytorch"):
        assert torch.allclose(out[impl, 64], out[impl, 64, "float32"], atol=1e-5)


def test_positions_continue_after_entries_are_dropped(tiny):
    """The next token's RoPE position is its place in the sequence, not in the slot."""
    cache = tiny.model.new_cache(1, 64)
    tiny.model.run([i % 8 for i in range(30)], cache)
    cache.compact(0, [[torch.arange(10)] * tiny.model.cfg.n_kv_heads] * tiny.model.cfg.n_layers)
    batch = Batch([Segment(0, [5, 6])], cache)
    assert batch.positions.tolist() == [30, 31] and batch.write.tolist() == [10, 11]


def test_streaming_rerotates_kept_keys_to_their_slot_positions(tiny):
    """StreamingLLM: after dropping, a kept key is rotated as if computed at its new place (layer 0's
    keys depend only on the token and its position, so a fresh run of the kept tokens is the
    reference), and the next token takes the next slot position, not its place in the text."""
    m = tiny.model
    ids = [i % 8 for i in range(1, 31)]
    cache = m.new_cache(1, 64)
    m.run(ids, cache)
    window_before = cache.k[0, 0, 22:30].clone()  # rotated at positions 22..29
    state = KVState(KVPolicy("streaming", budget=12, sinks=4, window=8))
    assert kv_policy.compress(0, state, cache, decoding=False)
    kept = ids[:4] + ids[-8:]
    fresh = m.new_cache(1, 64)
    m.run(kept, fresh)
    assert torch.allclose(cache.k[0, 0, :12], fresh.k[0, 0, :12], atol=1e-5)
    assert not torch.allclose(cache.k[0, 0, 4:12], window_before, atol=1e-2)  # (moving them was not enough)
    batch = Batch([Segment(0, [5, 6])], cache)
    assert batch.positions.tolist() == [12, 13] and cache.tokens(0) == 30


# ------------------------------------------------------------------ through the engine


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "h2o", "pyramid"])
def test_a_budget_that_holds_everything_changes_nothing(llm, policy):
    q = passkey(5)
    ref = llm.generate(q, max_tokens=24)
    c = llm.generate(q, max_tokens=24, kv_policy=policy, kv_budget=1024)
    assert c.token_ids == ref.token_ids


def test_a_planted_key_is_retrieved_from_the_entries_snapkv_keeps(llm):
    """1,000 tokens, 128 entries per head: SnapKV keeps the key (and positions stay right, or it
    would not come out whole); StreamingLLM's recent window does not hold it."""
    q = passkey(20)
    full = llm.generate(q, max_tokens=16)
    assert "71432" in full.text and full.prompt_tokens > 900
    assert "71432" in llm.generate(q, max_tokens=16, kv_policy="snapkv", kv_budget=128).text
    assert "71432" not in llm.generate(q, max_tokens=16, kv_policy="streaming", kv_budget=128).text


def test_quantized_kv_keeps_the_key_in_a_fraction_of_the_bytes(llm):
    """1,000 tokens: int8, int4 (its recent 128 in float32) and SnapKV + int4 all still retrieve the
    key; the bytes attention reads shrink by what each format says."""
    q = passkey(20)
    full = llm.generate(q, max_tokens=16)
    for policy, most in (
        (KVPolicy("int8"), 0.29),
        (KVPolicy("int4"), 0.3),  # (int4: 128 of ~1,000 in float32)
        (KVPolicy("snapkv+int4", budget=128, residual=32), 0.06),
    ):
        c = llm.generate(q, max_tokens=16, kv_policy=policy)
        assert "71432" in c.text, policy
        assert c.metrics["kv_bytes"] < most * full.metrics["kv_bytes"], policy


def test_int4_whose_window_holds_everything_changes_nothing(llm):
    q = passkey(5)
    ref = llm.generate(q, max_tokens=24)
    for policy in ("int4", "snapkv+int4"):
        c = llm.generate(q, max_tokens=24, kv_policy=KVPolicy(policy, budget=1024, residual=1024))
        assert c.token_ids == ref.token_ids, policy


def test_a_quantized_request_gets_the_same_output_alone_or_in_a_batch(llm):
    """Quantized copies are made as entries are written and each row reads its own recent window, so
    how the prompt was chunked (alone, or sharing steps with another) changes nothing."""
    q1, q2 = passkey(8), passkey(12, key=55555)
    alone = llm.generate(q1, max_tokens=16, kv_policy="int4", kv_budget=None)
    both = llm.generate([q1, q2], max_tokens=16, kv_policy="int4")
    assert both[0].token_ids == alone.token_ids and both[0].metrics["kv_bytes"] < both[0].metrics["kv_full_bytes"]


def test_speculative_decoding_under_a_policy_equals_plain_under_it(llm):
    """Exact, not close: the policy hears the queries of the rows plain decoding would have run (the
    step's own and the accepted drafts', one at a time), and a draft never runs past the token after
    which the policy drops entries (the end of the prompt; budget + slack while decoding). A slack of
    4 makes the policy compact every few tokens while the drafters draft."""
    q = passkey(10)
    h2o, streaming = KVPolicy("h2o", budget=160, slack=4), KVPolicy("streaming", budget=160, slack=4)
    for policy, drafter in ((h2o, "lookup"), (h2o, "hybrid"), (streaming, "lookup"), ("int8", "hybrid")):
        plain = llm.generate(q, max_tokens=48, kv_policy=policy)
        spec = llm.generate(q, max_tokens=48, kv_policy=policy, drafter=drafter)  # hybrid: a tree
        assert spec.token_ids == plain.token_ids, (policy, drafter)
        assert spec.metrics["mat"] > 1.0, (policy, drafter)  # the drafts were used


def test_calibrated_duo_heads_keep_the_key(llm, tmp_path):
    """`gearshift calibrate-duo` on generated passkeys finds a few heads that look at the needle
    (far above the median head); duo keeps those whole and streams the rest, and still retrieves."""
    from gearshift.cli import main

    out = tmp_path / "heads.json"
    assert (
        main(
            [
                "calibrate-duo",
                "--samples",
                "3",
                "--length",
                "1000",
                "--out",
                str(out),
                "--plot",
                str(tmp_path / "heads.png"),
            ]
        )
        == 0
    )
    import json

    scores = torch.tensor(json.loads(out.read_text())["scores"])
    assert scores.shape == (llm.model.cfg.n_layers, llm.model.cfg.n_kv_heads)
    assert scores.max() > 20 * scores.median() and (tmp_path / "heads.png").stat().st_size > 0
    q = passkey(20)
    c = llm.generate(q, max_tokens=16, kv_policy=KVPolicy("duo", budget=64, heads=str(out), retrieval=0.5))
    assert "71432" in c.text and c.metrics["kv_bytes"] < 0.6 * c.metrics["kv_full_bytes"]
    control = tmp_path / "random.json"  # as many heads kept whole, chosen at random: the key is lost
    control.write_text(
        json.dumps({"scores": torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)).tolist()})
    )
    c = llm.generate(q, max_tokens=16, kv_policy=KVPolicy("duo", budget=64, heads=str(control), retrieval=0.5))
    assert "71432" not in c.text


def test_streaming_runs_past_the_window_in_bounded_memory(tiny):
    """A slot of 64 positions, 600 generated tokens: sinks and window keep it bounded."""
    policy = KVPolicy("streaming", budget=24, sinks=4, window=8, slack=8)
    stream = tiny.stream("a b c d", kv_policy=policy, max_tokens=600, ignore_eos=True)
    longest = 0
    for _ in stream:
        longest = max(longest, max(tiny.core.cache.lengths))
    assert len(stream.completion.token_ids) == 600 and stream.completion.finish_reason == "length"
    assert longest <= 24 + 8 + 1


def test_a_slot_whose_entries_were_dropped_is_never_a_prefix_source(llm):
    fresh = gearshift.LLM(llm.loaded, max_num_seqs=2, max_model_len=2048)  # an engine with empty slots
    q = passkey(10)
    fresh.generate(q, max_tokens=4, kv_policy="snapkv", kv_budget=128)
    assert sum(fresh.core.cache.compacted) == 1  # kept for its own next turn only
    again = fresh.generate(q, max_tokens=4)
    assert again.cached_tokens == 0
    third = fresh.generate(q, max_tokens=4)  # a full cache is a source as before
    assert third.cached_tokens == third.prompt_tokens - 1 and third.token_ids == again.token_ids


def test_a_follow_up_turn_continues_its_compressed_cache_in_place(llm):
    """SCBench's multi-turn mode: turn 2 (same policy) reads only what is new, on top of the entries
    turn 1 kept; a request under another policy, or none, does not touch them."""
    fresh = gearshift.LLM(llm.loaded, max_num_seqs=2, max_model_len=2048)
    turn1 = passkey(10)
    a = fresh.generate(turn1, max_tokens=12, kv_policy="snapkv", kv_budget=128)
    slot = next(s for s in range(2) if fresh.core.cache.compacted[s])
    kept = fresh.core.cache.lengths[slot]
    assert kept < a.prompt_tokens and a.metrics["kv_bytes"] < a.metrics["kv_full_bytes"] / 3
    turn2 = turn1 + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "Say it once more."}]
    assert fresh.generate(turn2, max_tokens=4, kv_policy="h2o", kv_budget=128).cached_tokens == 0  # other policy
    b = fresh.generate(turn2, max_tokens=12, kv_policy="snapkv", kv_budget=128)
    assert b.cached_tokens == a.prompt_tokens + len(a.token_ids) - 1  # everything turn 1's slot went through
    assert b.metrics["kv_entries"] <= 30 * 3 * (128 + 12)  # compressed again at turn 2's prompt end


# ------------------------------------------------------------------ the benchmark's data and scoring


def test_benchmark_data_is_scbench_shaped_and_deterministic_from_its_seed(llm):
    from gearshift.tools.bench_kv import TASKS, generate

    a, b = generate(llm.tokenizer, 1000, seed=3), generate(llm.tokenizer, 1000, seed=3)
    assert a == b and generate(llm.tokenizer, 1000, seed=4) != a
    assert [i["task"] for i in a] == list(TASKS[:-1]) + ["needle"] * 4
    for item in a:
        assert {"id", "context", "multi_turns"} <= set(item) and len(item["multi_turns"]) == (
            1 if item["task"] == "needle" else 4
        )
        for turn in item["multi_turns"]:
            assert set(turn) == {"input", "answer"} and turn["answer"]
            if item["task"] != "manyshot":
                assert turn["answer"] in item["context"] or item["task"] == "multihop"
        n = len(llm.tokenizer.encode(item["context"], add_special_tokens=False))
        assert 500 < n <= 1000 - 80 * 4  # room left for 4 questions and answers in a multi-turn chat
    assert a[0]["context"] == a[1]["context"] == a[2]["context"] == a[3]["context"]  # one shared haystack


def test_benchmark_scoring_is_scbenchs():
    from gearshift.tools.bench_kv import score

    assert score("substring", "The pass key is 48213.", "48213") and not score("substring", "4821 3", "48213")
    assert score("first_int", "VAR X holds 48213, not 7", "48213") and not score("first_int", "7 then 48213", "48213")
    assert score("first_word", " kesh\nInput", "kesh") and not score("first_word", "it is kesh", "kesh")


def test_bench_kv_writes_results_flags_and_plots(tmp_path):
    from gearshift.tools.bench_kv import run_kv

    r = run_kv(
        None,
        [600],
        ["snapkv"],
        [128],
        ["multi-request"],
        ["passkey", "manyshot"],
        max_tokens=8,
        json_path=str(tmp_path / "kv.json"),
        plot_path=str(tmp_path / "kv.png"),
    )
    rows = {(x["task"], x["policy"]): x for x in r["results"]}
    assert set(rows) == {("passkey", "full"), ("passkey", "snapkv"), ("manyshot", "full"), ("manyshot", "snapkv")}
    for x in r["results"]:
        assert {
            "task",
            "mode",
            "length",
            "policy",
            "budget",
            "accuracy",
            "full_accuracy",
            "relative_accuracy",
            "kv_bytes",
            "full_kv_bytes",
            "decode_tok_per_s",
            "full_decode_tok_per_s",
            "prefill_s",
        } <= set(x)
        assert x["full_solves"] == (x["full_accuracy"] >= 0.5)
    assert rows[("passkey", "snapkv")]["kv_bytes"] < rows[("passkey", "full")]["kv_bytes"] / 2
    assert (tmp_path / "kv.png").stat().st_size > 0
