"""Speculative decoding is lossless: greedy token-identical, sampling distribution-exact."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gearshift import LLM
from gearshift import verify as verify_module
from gearshift.attention import tree_paths
from gearshift.drafters import DraftLength, LookupDrafter, ModelDrafter, Proposal, Recycling, Suffix, TreeDrafter
from gearshift.drafters.recycling import template
from gearshift.drafters.suffix import SuffixAutomaton
from gearshift.errors import GearshiftError
from gearshift.hardware import CostModel, forward_costs
from gearshift.loading import load, read_checkpoint
from gearshift.sampling import SamplingParams, probs
from gearshift.strategies import make_drafter as build_drafter
from tiny import VOCAB, tiny_model_dir


def make_drafter(spec: str, llm: LLM):
    """A fresh drafter for `llm` by its command-line name."""
    return build_drafter(spec, llm.model, llm.tokenizer, llm.loaded.path)


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in two sentences.",
    "List the first five prime numbers.",
    "Translate 'good morning' into Spanish, French and German.",
    "Summarize: The cat sat on the mat. The cat was happy. The mat was red. The cat sat on the red mat all day.",
    "Repeat after me: one two three four five, one two three four five.",
    "Write a Python function that returns the square of a number.",
    "What is 15 times 12?",
    "Give three tips for better sleep.",
    "Describe the color blue to someone who cannot see.",
    "Continue the list: apple, banana, cherry,",
    "Write a short email asking for a meeting tomorrow.",
    "Rewrite this sentence in the passive voice: The dog chased the ball.",
    "def fib(n):\n    # return the n-th Fibonacci number\n",
]


@pytest.fixture(scope="module")
def plain(llm):
    """Plain greedy outputs, decoded side by side (test_core shows each equals the prompt alone)."""
    return [c.token_ids for c in llm.generate([[{"role": "user", "content": p}] for p in PROMPTS], max_tokens=48)]


def write_truncated_draft(src: LLM, path: Path, layers: int, vocab: int) -> None:
    """A real Hugging Face directory holding the default model's first `layers` blocks, with its
    vocabulary cut or padded to `vocab` (to exercise the vocabulary alignment)."""
    ck = read_checkpoint(src.loaded.path)
    cfg = ck.config
    tensors = {
        k: v for k, v in ck.tensors.items() if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers
    }
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = (
        emb[:vocab] if vocab <= len(emb) else torch.cat([emb, emb.new_zeros(vocab - len(emb), emb.shape[1])])
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": cfg.dim,
                "intermediate_size": cfg.hidden_dim,
                "num_hidden_layers": layers,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads,
                "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "max_position_embeddings": cfg.max_seq_len,
                "tie_word_embeddings": True,
                "eos_token_id": cfg.eos_token_ids,
            }
        )
    )
    src.tokenizer.save(path)


@pytest.fixture(scope="module")
def draft_dir(llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("draft")
    write_truncated_draft(llm, path, layers=8, vocab=49000)  # fewer ids than the target: masked
    return path


@pytest.mark.parametrize("spec", ["lookup", "early-exit:6", "model", "recycling", "suffix", "hybrid"])
def test_greedy_token_identical_to_plain(llm, plain, draft_dir, spec):
    """All prompts decoded side by side in one continuous batch (8 at a time, each sequence with its
    own fork of the drafter, joining as others finish) give each prompt's plain output alone."""
    drafter = make_drafter(f"model:{draft_dir}" if spec == "model" else spec, llm)
    outs = llm.generate([[{"role": "user", "content": p}] for p in PROMPTS], drafter=drafter, max_tokens=48)
    proposed = accepted = 0
    for p, ref, c in zip(PROMPTS, plain, outs):
        assert c.token_ids == ref, p
        proposed += c.metrics["proposed"]
        accepted += c.metrics["accepted"]
        assert c.metrics["target_forwards"] <= len(ref) + 1
    assert proposed > 0 and accepted > 0  # the drafter really drafted, and was right sometimes


def test_metrics_of_speculative_generation(llm):
    c = llm.generate([{"role": "user", "content": PROMPTS[6]}], drafter="lookup", max_tokens=48)
    m = c.metrics
    eos = c.finish_reason == "stop"  # the stopping EOS came out of a forward too
    assert m["mat"] * m["target_forwards"] == pytest.approx(len(c.token_ids) + eos)
    assert m["mat"] > 1.0 and 0 < m["acceptance_rate"] <= 1
    assert m["draft_s"] >= 0 and m["verify_s"] > 0
    assert llm.generate("Hello", max_tokens=8, ignore_eos=True).metrics["mat"] == 1.0


def test_stream_with_drafter_equals_generate(llm):
    msgs = [{"role": "user", "content": PROMPTS[5]}]
    assert "".join(llm.stream(msgs, drafter="lookup", max_tokens=40)) == llm.generate(msgs, max_tokens=40).text


def test_tree_forward_is_exact_and_keeps_one_path(llm):
    """Every node of a tree scored in one pass gets bitwise the logits of decoding its path one
    token at a time; after `keep`, the cache continues exactly as if only that path was decoded."""
    m = llm.model
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 49152, (40,), generator=g).tolist()
    parents = [-1, 0, 0, 1, 1, 2, 3, 0, 7, 5, 9]
    tokens = torch.randint(0, 49152, (len(parents),), generator=g).tolist()

    def decode_path(path):
        cache = m.new_cache(1, 128)
        m.run(prefix, cache)
        for n in path:
            out = m.run([tokens[n]], cache)[-1]
        return out, cache

    with torch.inference_mode():
        cache = m.new_cache(1, 128)
        m.run(prefix, cache)
        logits = m.run(tokens, cache, parents=parents[1:])
        for i, path in enumerate(tree_paths(parents)):
            assert torch.equal(logits[i], decode_path(path)[0]), i
        path = tree_paths(parents)[9]  # 0 -> 2 -> 5 -> 9: not contiguous
        cache.keep(0, 40, path)
        _, ref = decode_path(path)
        assert cache.lengths[0] == ref.lengths[0]
        assert torch.equal(m.run([7], cache), m.run([7], ref))


def test_unknown_drafter(llm):
    assert isinstance(make_drafter("auto", llm), LookupDrafter)  # auto picks prompt lookup
    with pytest.raises(GearshiftError):
        make_drafter("magic", llm)
    with pytest.raises(GearshiftError):
        make_drafter("early-exit:99", llm)


# ------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = LLM(load(tiny_model_dir(root / "target", 2, seed=1), weights="int8", device="cpu", use_cache=False))
    draft = load(tiny_model_dir(root / "draft", 1, seed=2), weights="int8", device="cpu", use_cache=False)
    return target, draft


def test_greedy_property_random_prompts_tiny(tiny):
    """Random prompts with repeats (so lookup matches), every drafter, decoded side by side:
    identical to plain decoding of each prompt alone."""
    target, draft = tiny
    g = torch.Generator().manual_seed(0)
    drafters = [
        LookupDrafter(),
        ModelDrafter(draft.model, VOCAB, "model", confidence=0.0),
        ModelDrafter(target.model, VOCAB, "early-exit:1", n_layers=1, confidence=0.0),
        TreeDrafter("recycling", [Recycling(VOCAB, k=4)], max_nodes=16),  # no cost curve: full trees
        TreeDrafter("suffix", [Suffix(corpus=[1, 2, 3, 4] * 8)], max_nodes=16),
        TreeDrafter("hybrid", [Recycling(VOCAB, k=4), Suffix()], max_nodes=16),
    ]
    prompts = []
    for case in range(40):
        base = torch.randint(0, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        prompts.append(base * int(torch.randint(1, 4, (1,), generator=g)))
    refs = [target.generate(p, max_tokens=30, ignore_eos=True).token_ids for p in prompts]  # each alone
    for d in drafters:  # all 40 side by side in one continuous batch
        outs = target.generate(prompts, drafter=d, max_tokens=30, ignore_eos=True)
        assert [c.token_ids for c in outs] == refs, d.name


def exact_pair_distribution(target: LLM, prompt: list[int], p: SamplingParams) -> torch.Tensor:
    """P(first two tokens) computed from the target's own distributions: the ground truth."""
    m = target.model
    with torch.inference_mode():
        first = probs(m.run(prompt, m.new_cache(1, 64))[-1], p)
        second = torch.stack([probs(m.run(prompt + [a], m.new_cache(1, 64))[-1], p) for a in range(VOCAB)])
    return (first[:, None] * second).flatten()


def chi_square(target: LLM, drafter, prompt: list[int], p: SamplingParams, n: int) -> float:
    truth = exact_pair_distribution(target, prompt, p)
    counts = torch.zeros(VOCAB * VOCAB)
    wide = LLM(target.loaded, max_num_seqs=64)  # n samples (seeds 0 .. n - 1), 64 decoded side by side
    for c in wide.generate(
        prompt,
        drafter=drafter,
        n=n,
        seed=0,
        max_tokens=2,
        ignore_eos=True,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
    ):
        counts[c.token_ids[0] * VOCAB + c.token_ids[1]] += 1
    assert counts[truth == 0].sum() == 0  # nothing outside the target's support
    keep = truth * n >= 5  # pool rare cells, as the chi-square approximation needs
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([truth[keep] * n, (truth[~keep].sum() * n)[None]])
    expected, observed = expected[expected > 0], observed[expected > 0]
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


def critical_value(df: int) -> float:
    """Chi-square critical value at p = 1e-4 (Wilson-Hilferty); stable: one false alarm in 10,000."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


SAMPLING = SamplingParams(temperature=0.9, top_k=6, top_p=0.95)


def broken_residual(p, q):
    """A classic bug: after a rejection, resample from the target itself instead of max(0, p - q)."""
    return p


@pytest.mark.parametrize("rule", ["exact", "broken"])
@pytest.mark.parametrize("which", ["model", "lookup", "tree"])
def test_sampling_keeps_target_distribution(tiny, monkeypatch, rule, which):
    """`tree`: Token Recycling trees branch 4 ways at every node, so siblings are really tried in turn."""
    target, draft = tiny
    prompt = [1, 2, 3, 1, 2]
    drafter = {
        "model": lambda: ModelDrafter(draft.model, VOCAB, "model", confidence=0.0),
        "lookup": LookupDrafter,
        "tree": lambda: TreeDrafter("recycling", [Recycling(VOCAB, k=4)], max_nodes=12),
    }[which]()
    if rule == "broken":
        monkeypatch.setattr(verify_module, "residual", broken_residual)
    chi2, df = chi_square(target, drafter, prompt, SAMPLING, n=3000)
    if rule == "exact":
        assert chi2 < critical_value(df), (chi2, df)
    else:
        assert chi2 > critical_value(df), (chi2, df)  # the test has the power to catch a wrong rule


def test_plain_sampling_matches_exact_distribution(tiny):
    """The ground truth itself: plain sampling passes the same test."""
    target, _ = tiny
    chi2, df = chi_square(target, None, [1, 2, 3, 1, 2], SAMPLING, n=3000)
    assert chi2 < critical_value(df)


def test_lookup_drafter_and_draft_length():
    d = LookupDrafter(min_n=1, max_n=3, per_match_token=8)
    p = SamplingParams()
    ctx = [5, 6, 7, 8, 9, 5, 6]
    assert d.propose(ctx, 3, p, None).tokens == [7, 8, 9]  # longest suffix [5, 6] matched
    assert LookupDrafter().propose([1, 2, 3], 3, p, None).tokens == []
    assert d.propose(ctx + [7, 1, 5, 6, 7], 2, p, None).tokens == [1, 5]  # latest occurrence of [5, 6, 7] wins
    short = LookupDrafter(min_n=1, max_n=3, per_match_token=2)
    assert short.propose([4, 1, 2, 3, 4, 5, 9, 4], 8, p, None).tokens == [5, 9]  # 1-token match: 2 tokens
    length = DraftLength(k=4, k_min=1, k_max=6)
    length.update(4, 4)
    assert length.k == 5
    length.update(5, 1)
    assert length.k == 4
    for _ in range(10):
        length.update(3, 0)
    assert length.k == 1


def test_tree_verification_greedy_walks_the_argmax_path():
    logits = torch.full((6, VOCAB), -5.0)
    # root's argmax is 3 (draft 1), that node's argmax is 5 (draft 3), whose argmax 7 has no node
    for node, best in [(0, 3), (2, 5), (4, 7)]:
        logits[node, best] = 5.0
    proposal = Proposal([2, 3, 4, 5, 6], parents=[0, 0, 2, 2, 1])
    v = verify_module.verify(logits[:6], proposal, SamplingParams(), None)
    assert v.path == [1, 3] and v.tokens == [3, 5, 7]


def test_suffix_automaton_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        text = torch.randint(0, 3, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        sam = SuffixAutomaton(text)
        state, length = sam.repeat()
        earlier = [n for n in range(1, len(text)) if any(text[i : i + n] == text[-n:] for i in range(len(text) - n))]
        assert length == max(earlier, default=0)
        if length:
            follow = {text[i + length] for i in range(len(text) - length) if text[i : i + length] == text[-length:]}
            assert {b[0] for b in sam.branches(state, 10, 4)} == follow
        probe = torch.randint(0, 3, (6,), generator=g).tolist()
        _, n = sam.match(probe)
        assert n == max(
            (k for k in range(7) if any(text[i : i + k] == probe[6 - k :] for i in range(len(text) - k + 1))), default=0
        )


def test_recycling_matrix_memory_template_and_warm_start(tmp_path):
    r = Recycling(49152)
    assert r.adjacency.nbytes < 2 * 1024 * 1024
    shape = template(64)
    assert len(shape) == 64 and all(parent < i for i, (parent, _) in enumerate(shape, start=1))
    assert [rank for parent, rank in shape if parent == 0] == list(range(8))  # wide at the top
    logits = torch.randn(3, 49152)
    r.learn([10, 20, 10], logits)
    assert r.adjacency[20].tolist() == logits[1].topk(8).indices.tolist()
    assert r.adjacency[10].tolist() == logits[2].topk(8).indices.tolist()  # latest seen wins
    tokens, parents, _ = r.grow([5, 10], 64)
    assert tokens[:8] == r.adjacency[10].tolist() and parents[:8] == [0] * 8
    r.save(tmp_path / "m.npy")
    warm = Recycling(49152, path=tmp_path / "m.npy")
    assert warm.grow([5, 10], 64) == r.grow([5, 10], 64)
    with pytest.raises(GearshiftError):
        Recycling(100, path=tmp_path / "m.npy")  # another vocabulary's matrix


def test_tree_size_follows_the_cost_curve():
    """Flat cost (a GPU): verify every node worth anything; steep cost (this CPU): only the surest."""
    flat = TreeDrafter("t", [Recycling(VOCAB)], CostModel([1, 128], [1.0, 1.0]))
    steep = TreeDrafter("t", [Recycling(VOCAB)], CostModel([1, 2, 128], [1.0, 1.3, 100.0]))
    scores = [0.9, 0.6, 0.3, 0.1, 0.05]
    assert flat._size(scores, 5) == [0, 1, 2, 3, 4]
    assert steep._size(scores, 5) == [0]
    assert steep._size([0.1], 1) == []  # not worth the extra cost


def test_forward_costs_are_measured_once_and_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GEARSHIFT_HOME", str(tmp_path))
    target, _ = tiny
    costs = forward_costs(target.model, "tiny")
    assert len(costs.sizes) == len(costs.seconds) and all(s > 0 for s in costs.seconds)
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    assert forward_costs(target.model, "tiny") == costs  # read back, not measured again
    assert costs(costs.sizes[-1]) == costs.seconds[-1]  # (whether more tokens cost more is timing: not asserted)
    line = CostModel([1, 64, 128], [1.0, 2.0, 3.0])
    assert line(96) == 2.5 and line(1000) == pytest.approx(3.0 + (1000 - 128) / 64)  # past the end: the last slope
