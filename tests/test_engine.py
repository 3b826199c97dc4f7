"""Engine behaviour on the default model: streaming, batching, stops, seeds, KV rollback."""

import math

import pytest
import torch

import gearshift
from gearshift.errors import GearshiftError
from gearshift.sampling import SamplingParams, probs, sample

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling in a quiet park at dusk."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name two planets."}],
]


@pytest.fixture(scope="module")
def llm():
    return gearshift.load()


@pytest.fixture(scope="module")
def exact():
    """float32 weights: the mode whose arithmetic has no bf16 rounding to amplify differences."""
    return gearshift.load(weights="float32")


def test_stream_concatenates_to_generate(llm):
    text = "".join(llm.stream(CHATS[0], max_tokens=40))
    done = llm.generate(CHATS[0], max_tokens=40)
    assert text == done.text == llm.last.text
    assert llm.last.token_ids == done.token_ids
    assert done.text.strip()


def test_batch_matches_one_at_a_time(exact):
    """Left-padded rows see the same context as single prompts.

    Padding changes the attention's summation order, so logits agree to float32 rounding rather
    than bit for bit (hence the float32 weights here: the packed kernels round to bf16); a masking
    or position bug would change them by whole units.
    """
    prompts = [exact.encode(c) for c in CHATS]
    assert len({len(p) for p in prompts}) == 3  # the batch really needs left padding
    m, longest = exact.model, max(len(p) for p in prompts)
    cache = m.new_cache(3, 128)
    cache.reset(torch.tensor([longest - len(p) for p in prompts]))
    with torch.inference_mode():
        batched = m(torch.tensor([[0] * (longest - len(p)) + p for p in prompts]), cache, last_only=True)[:, -1]
        single = torch.cat([m(torch.tensor([p]), m.new_cache(1, 128), last_only=True)[:, -1] for p in prompts])
    assert (batched - single).abs().max() < 1e-3
    batch = exact.generate(CHATS, max_tokens=24)
    assert [b.token_ids for b in batch] == [exact.generate(c, max_tokens=24).token_ids for c in CHATS]


def test_token_ids_prompt_equals_text_prompt(llm):
    ids = llm.encode(CHATS[0])
    assert llm.generate(ids, max_tokens=16).token_ids == llm.generate(CHATS[0], max_tokens=16).token_ids


def test_max_tokens_and_finish_reason(llm):
    c = llm.generate("Once upon a time", max_tokens=7, ignore_eos=True)
    assert len(c.token_ids) == 7 and c.finish_reason == "length"


def test_eos_stops_generation(llm):
    c = llm.generate(CHATS[0], max_tokens=200)
    assert c.finish_reason == "stop" and len(c.token_ids) < 200
    assert not set(c.token_ids) & llm.eos_ids


def test_stop_string_cuts_text_and_is_never_streamed(llm):
    free = llm.generate(CHATS[2], max_tokens=40).text
    stop = free.split()[1]  # a word the model is known to produce
    deltas = list(llm.stream(CHATS[2], max_tokens=40, stop=[stop]))
    assert llm.last.finish_reason == "stop"
    assert "".join(deltas) == llm.last.text == free[: free.index(stop)]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_seed_makes_sampling_reproducible(llm):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a = llm.generate("The weather today", seed=123, **kw).token_ids
    b = llm.generate("The weather today", seed=123, **kw).token_ids
    c = llm.generate("The weather today", seed=7, **kw).token_ids
    assert a == b and a != c


def test_kv_rollback_recomputes_identically(llm):
    m = llm.model
    ids = torch.tensor([llm.encode(CHATS[0])])
    cache = m.new_cache(1, 256)
    with torch.inference_mode():
        m(ids, cache)
        n = cache.length
        first = m(torch.tensor([[100, 200, 300]]), cache)
        assert cache.length == n + 3
        cache.rollback(n)
        m(torch.tensor([[7, 8]]), cache)  # overwrite the slots with something else
        cache.rollback(n)
        again = m(torch.tensor([[100, 200, 300]]), cache)
    assert torch.equal(first, again)
    with pytest.raises(ValueError):
        cache.rollback(cache.length + 1)


def test_one_token_steps_equal_one_multi_token_forward(exact):
    """Decoding token by token and scoring the same tokens at once agree (float32 weights)."""
    m = exact.model
    ids = exact.encode(CHATS[1])
    with torch.inference_mode():
        c1 = m.new_cache(1, 256)
        full = m(torch.tensor([ids]), c1)[0]
        c2 = m.new_cache(1, 256)
        m(torch.tensor([ids[:10]]), c2)
        steps = torch.cat([m(torch.tensor([[t]]), c2)[0] for t in ids[10:]])
    assert torch.equal(full[10:].argmax(-1), steps.argmax(-1))
    assert (full[10:] - steps).abs().max() < 1e-3


def test_prompt_longer_than_context(llm):
    with pytest.raises(GearshiftError, match="context window"):
        llm.generate("word " * (llm.model.cfg.max_seq_len + 10), max_tokens=4)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_tokens=0), dict(temperature=math.nan), dict(stop=[""])])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(GearshiftError):
        SamplingParams(**bad)


def test_top_k_top_p_distribution_is_exact():
    """Empirical frequencies of `sample` match `probs`, which keeps exactly the top-k / top-p set."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    p = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    dist = probs(logits, p)[0]
    kept = (dist > 0).nonzero().flatten().tolist()
    full = torch.softmax(logits[0] / 0.7, -1)
    # top-p: the smallest prefix of the top-4 whose mass reaches 0.9
    top4 = full.topk(4).values / full.topk(4).values.sum()
    need = int((top4.cumsum(0) < 0.9).sum()) + 1
    assert kept == list(range(need))
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(sample(logits.expand(n, -1), p, g), minlength=6).float()
    expected = dist * n
    chi2 = (((counts - expected) ** 2) / expected.clamp(min=1e-9))[dist > 0].sum().item()
    assert chi2 < 20.5  # chi-square critical value for df <= 5 at p = 0.001
    assert counts[dist == 0].sum() == 0
