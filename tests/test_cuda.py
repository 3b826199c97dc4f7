"""CUDA, run by `make gpu-check` on a GPU machine (skipped where there is no GPU): a tiny random
model's logits against the CPU, and speculative decoding against plain decoding on the GPU."""

import pytest
import torch

import gearshift
from tiny import tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cuda") / "tiny", layers=2, seed=0, head_scale=0.5)


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_tiny_model_logits_on_cuda_match_the_cpu(tiny, weights):
    ids = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    logits = {}
    for device in ("cpu", "cuda"):
        m = gearshift.load(str(tiny), device=device, weights="float32" if device == "cpu" else weights).model
        with torch.inference_mode():
            logits[device] = m.run(ids, m.new_cache(1, 64), logits_from=0).float().cpu()
    cuda, cpu = logits["cuda"], logits["cpu"]
    if weights == "float32":
        assert torch.allclose(cuda, cpu, atol=1e-4, rtol=1e-4), (cuda - cpu).abs().max()
    else:  # bf16 weights and activations (8-bit mantissa, 0.4% per rounding) through every layer:
        # judge each row's logit vector as a whole (2.3% was seen on an H200), and the clear greedy choices
        rel = ((cuda - cpu).norm(dim=-1) / cpu.norm(dim=-1)).max()
        assert rel < 5e-2, rel
        top2 = cpu.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.25  # rows whose greedy token is not a near tie
        assert torch.equal(cuda.argmax(-1)[clear], cpu.argmax(-1)[clear])


def test_speculative_greedy_equals_plain_on_cuda(tiny):
    """float32 on the GPU: lookup drafting and a continuous batch of three give the plain greedy
    tokens; where they do not, the divergence must be at a near tie (top-2 gap < 1e-3)."""
    llm = gearshift.load(str(tiny), device="cuda", weights="float32", max_num_seqs=3)
    prompts = ["a b c d a b c", "h g f e h g", "b b b b c c c"]
    plain = [llm.generate(p, max_tokens=40, logprobs=2) for p in prompts]
    for drafter in (None, "lookup"):
        outs = llm.generate(prompts, max_tokens=40, drafter=drafter)
        for p, o in zip(plain, outs):
            if o.token_ids != p.token_ids:
                i = next(i for i, (a, b) in enumerate(zip(o.token_ids, p.token_ids)) if a != b)
                top = p.logprobs[i].top_logprobs
                assert top[0].logprob - top[1].logprob < 1e-3, f"divergence at token {i} without a near tie"


def test_compacted_cache_attends_the_same_entries_on_cuda(tiny):
    """KV policies on the GPU: per-head holes after `compact` give the CPU's logits, and a budget
    that holds everything gives plain decoding's tokens."""
    ids = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6]
    logits = {}
    for device in ("cpu", "cuda"):
        m = gearshift.load(str(tiny), device=device, weights="float32").model
        cache = m.new_cache(1, 64)
        m.run(ids, cache)
        per_head = [torch.tensor([0, 1, 17, 18, 19])] + [torch.tensor([0, 1, 2, 3, 15, 16, 17, 18, 19])] * (
            m.cfg.n_kv_heads - 1
        )
        cache.compact(0, [per_head] * m.cfg.n_layers)
        with torch.inference_mode():
            logits[device] = m.run([5, 6], cache, logits_from=0).float().cpu()
    assert torch.allclose(logits["cuda"], logits["cpu"], atol=1e-4, rtol=1e-4), (
        (logits["cuda"] - logits["cpu"]).abs().max()
    )
    llm = gearshift.load(str(tiny), device="cuda", weights="float32")
    plain = llm.generate("a b c d a b c", max_tokens=30)
    for policy in ("snapkv", "h2o", "streaming"):
        assert llm.generate("a b c d a b c", max_tokens=30, kv_policy=policy, kv_budget=64).token_ids == plain.token_ids
