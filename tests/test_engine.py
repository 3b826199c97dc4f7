"""Engine behaviour on the default model: streaming, stops, seeds, KV rollback, exact rows."""

import math

import pytest
import torch

from gearshift.errors import GearshiftError
from gearshift.sampling import SamplingParams, probs, sample

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves falling in a quiet park at dusk."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name two planets."}],
]


def test_stream_concatenates_to_generate(llm):
    stream = llm.stream(CHATS[0], max_tokens=40)
    text = "".join(stream)
    done = llm.generate(CHATS[0], max_tokens=40)
    assert text == done.text == stream.completion.text
    assert stream.completion.token_ids == done.token_ids
    assert done.text.strip()


def test_token_ids_prompt_equals_text_prompt(llm):
    ids = llm.encode(CHATS[0])
    assert llm.generate(ids, max_tokens=16).token_ids == llm.generate(CHATS[0], max_tokens=16).token_ids


def test_max_tokens_and_finish_reason(llm):
    c = llm.generate("Once upon a time", max_tokens=7, ignore_eos=True)
    assert len(c.token_ids) == 7 and c.finish_reason == "length"


def test_eos_stops_generation_at_the_first_eos(llm):
    """Whatever the CPU's rounding makes the model write, generation ends exactly at its first EOS."""
    for chat in CHATS + [[{"role": "user", "content": "Say hello."}]]:
        free = llm.generate(chat, max_tokens=120, ignore_eos=True).token_ids
        first = next((i for i, t in enumerate(free) if t in llm.eos_ids), None)
        if first is not None:
            break
    assert first is not None, "no test prompt reaches EOS within 120 tokens"
    c = llm.generate(chat, max_tokens=120)
    assert c.finish_reason == "stop" and c.token_ids == free[:first]
    assert not set(c.token_ids) & llm.eos_ids


def test_stop_string_cuts_text_and_is_never_streamed(llm):
    free = llm.generate(CHATS[2], max_tokens=40).text
    stop = free.split()[1]  # a word the model is known to produce
    stream = llm.stream(CHATS[2], max_tokens=40, stop=[stop])
    deltas = list(stream)
    assert stream.completion.finish_reason == "stop"
    assert "".join(deltas) == stream.completion.text == free[: free.index(stop)]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_seed_makes_sampling_reproducible(llm):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a = llm.generate("The weather today", seed=123, **kw).token_ids
    b = llm.generate("The weather today", seed=123, **kw).token_ids
    c = llm.generate("The weather today", seed=7, **kw).token_ids
    assert a == b and a != c


def test_kv_rollback_recomputes_identically(llm):
    m = llm.model
    cache = m.new_cache(1, 256)
    with torch.inference_mode():
        m.run(llm.encode(CHATS[0]), cache)
        n = cache.lengths[0]
        first = m.run([100, 200, 300], cache)
        assert cache.lengths[0] == n + 3
        cache.rollback(0, n)
        m.run([7, 8], cache)  # overwrite the slots with something else
        cache.rollback(0, n)
        again = m.run([100, 200, 300], cache)
    assert torch.equal(first, again)
    with pytest.raises(ValueError):
        cache.rollback(0, cache.lengths[0] + 1)


def test_one_token_steps_equal_one_multi_token_forward(llm):
    """Decoding token by token and reading the same tokens in one forward agree bit for bit: every
    row is computed as a one-token step computes it (the int4/int8 kernels are row-independent)."""
    m = llm.model
    ids = llm.encode(CHATS[1])
    with torch.inference_mode():
        full = m.run(ids, m.new_cache(1, 256))
        c2 = m.new_cache(1, 256)
        head = m.run(ids[:10], c2)
        steps = torch.cat([head] + [m.run([t], c2) for t in ids[10:]])
    assert torch.equal(full, steps)


def test_prompt_longer_than_context(llm):
    with pytest.raises(GearshiftError, match="context window"):
        llm.generate("word " * (llm.model.cfg.max_seq_len + 10), max_tokens=4)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(temperature=math.nan),
        dict(stop=[""]),
        dict(logprobs=-1),
        dict(logprobs=True),
        dict(logprobs=2.0),
    ],
)
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
