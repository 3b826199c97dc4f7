"""Architectures without downloads: tiny random models built with transformers' own config and
model classes, saved as safetensors, and checked against transformers itself (float32 logits and
greedy tokens), then through the engine's features (batching, speculative decoding), and through
llama.cpp's own GGUF converter. (`test_correctness` goes deeper on Llama and Qwen2: tied
embeddings, biases, sharded checkpoints, hand-written GGUFs with k-quants.)"""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gearshift import LLM
from gearshift.loading import load
from gearshift.tools import llama_cpp
from gearshift.tools.bench import agreement
from tiny import TINY_DIMS, randomize

transformers = pytest.importorskip("transformers")

VOCAB = 96
LLAMA_CPP = llama_cpp.default_dir()  # the user's build, looked up before the session moves $GEARSHIFT_HOME
COMMON = dict(
    vocab_size=VOCAB,
    **TINY_DIMS,
    num_hidden_layers=2,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,  # random models would stop anywhere: compare fixed lengths
    pad_token_id=None,
)


def _configs(vocab: int = VOCAB, **overrides) -> dict:
    t = transformers
    common = {**COMMON, "vocab_size": vocab, **overrides}
    return {
        "llama": lambda: t.LlamaConfig(**common),
        "llama3-rope": lambda: t.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "mistral": lambda: t.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: t.Qwen2Config(**common),
        "qwen3": lambda: t.Qwen3Config(**common, head_dim=16),
        "phi3": lambda: t.Phi3Config(**common),
        # Phi-3-128k's LongRoPE: within the pretraining length (64 here, so the 40-token checks stay in
        # it) the short factors and cos/sin scaled by the attention factor; the context stops there
        "phi3-longrope": lambda: t.Phi3Config(
            **{**common, "max_position_embeddings": 256},
            original_max_position_embeddings=64,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.4 * i for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)],
                "original_max_position_embeddings": 64,
            },
        ),
        "smollm3": lambda: t.SmolLM3Config(**{"no_rope_layers": [1, 0], **common}),  # layer 1: no RoPE
        # a window of 8 in the first layer, so the 40-token checks slide it; a softmax scale that is not
        # 1/sqrt(head_dim); each layer kind its own RoPE base
        "gemma3": lambda: t.Gemma3TextConfig(
            **{
                "head_dim": 16,
                "query_pre_attn_scalar": 24,
                "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"],
                **common,
            },
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
    }


ARCHS = list(_configs())


def tiny_hf(path, name: str, seed: int = 0, tokenizer=None, **overrides):
    """A random transformers model of this architecture (`tiny.randomize`), config arguments
    overridden by `overrides`. With `tokenizer` (a directory of tokenizer files), that tokenizer and
    its vocabulary size; else a word-level one over VOCAB."""
    vocab = HFTokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size() if tokenizer else VOCAB
    cfg = _configs(vocab, **overrides)[name]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, path / f.name)
        return model
    tok = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = tiny_hf(path, request.param)
    return request.param, hf, LLM(load(path, weights="float32", use_cache=False)), path


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def test_logits_and_greedy_tokens_match_transformers(pair):
    name, hf, llm, path = pair
    assert llm.model.cfg.arch == json.loads((path / "config.json").read_text())["model_type"].replace("_text", "")
    if name == "phi3-longrope":
        assert llm.model.cfg.max_seq_len == 64 and llm.model.cfg.rope_scaling["attention_factor"] > 1
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    cache = llm.model.new_cache(1, 64)
    ours = llm.model.run(ids, cache)
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4), (name, (ours - ref).abs().max())
    for prompt in (ids[:5], ids[:17]):
        want = hf_greedy(hf, prompt, 24)
        got = llm.generate(prompt, max_tokens=24, temperature=0).token_ids
        assert got == want, name


def test_engine_features_hold_on_every_architecture(pair):
    """Batched = alone, and speculative (lookup) = plain, token for token."""
    name, _, llm, _ = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 11, 19)]
    prompts[2] = prompts[2][:8] * 2 + prompts[2][8:]  # repeats: something for lookup to find
    alone = [llm.generate(p, max_tokens=20, temperature=0).token_ids for p in prompts]
    assert [c.token_ids for c in llm.generate(prompts, max_tokens=20, temperature=0)] == alone, name
    spec = [c.token_ids for c in llm.generate(prompts, drafter="lookup", max_tokens=20, temperature=0)]
    assert spec == alone, name


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """The default model's tokenizer (a BPE that llama.cpp's converter knows), for tiny models
    that go through GGUF."""
    from gearshift import hub
    from gearshift.loading import _convert_gguf_tokenizer

    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    _convert_gguf_tokenizer(hub.resolve_model(None), path)
    return path


@pytest.fixture(scope="module")
def convert():
    pytest.importorskip("sentencepiece")
    from gearshift.errors import GearshiftError
    from gearshift.tools import llama_cpp

    try:
        llama_cpp.converter()
    except GearshiftError as e:  # no index to download the sdist from
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    return llama_cpp.convert_hf


# Left out: qwen2, because the borrowed BPE tokenizer does not get through the converter for it
# (transformers 5 reads it through its Qwen2 class whatever tokenizer_config.json says, and the
# converter does not know that pre-tokenizer's hash). Phi-3's converter reads a GPT-2 BPE tokenizer
# where tokenizer_config.json names one (Phi-4's path), else it wants SentencePiece's tokenizer.model
GGUF_ARCHS = [a for a in ARCHS if a != "qwen2"]
# A GGUF says less than a Gemma 3 or SmolLM3 config: llama.cpp takes every sixth Gemma layer as
# global and scales attention by head_dim (`loading._gguf_gemma3`), and every fourth SmolLM3 layer as
# NoPE, so the models converted are of that shape
GGUF_OVERRIDES = {
    "gemma3": dict(num_hidden_layers=6, query_pre_attn_scalar=16, layer_types=None, sliding_window_pattern=6),
    "smollm3": dict(num_hidden_layers=4, no_rope_layers=None),  # llama.cpp: every fourth layer is NoPE
}


@pytest.mark.parametrize("name", GGUF_ARCHS)
def test_llama_cpp_gguf_of_a_tiny_model_runs_like_its_safetensors(
    name, smollm2_tokenizer, convert, tmp_path, monkeypatch
):
    """The same tiny model, converted by llama.cpp's own convert_hf_to_gguf.py (float32): the GGUF
    path (llama.cpp's names, q/k row order, RoPE metadata) must give the safetensors path's logits."""
    hf_dir = tmp_path / "hf"
    tiny_hf(hf_dir, name, seed=3, tokenizer=smollm2_tokenizer, **GGUF_OVERRIDES.get(name, {}))
    if name.startswith("phi3"):
        config = json.loads((hf_dir / "tokenizer_config.json").read_text())
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    gguf_path = convert(hf_dir, tmp_path / "tiny.gguf")
    from_hf, from_gguf = (load(p, weights="float32", use_cache=False) for p in (hf_dir, gguf_path))
    text = "Hello world, it's 2026: tokens; émigré!"
    assert from_gguf.tokenizer.encode(text, add_special_tokens=False) == from_hf.tokenizer.encode(
        text, add_special_tokens=False
    )
    a, b = from_hf.model, from_gguf.model
    ids = torch.randint(0, a.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    la, lb = a.run(ids, a.new_cache(1, 64)), b.run(ids, b.new_cache(1, 64))
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5), (name, (la - lb).abs().max())
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    if llama_cpp.binary("llama-server", LLAMA_CPP) is None or name == "phi3-longrope":
        # (llama.cpp is not built here: `gearshift build-llama-cpp`. LongRoPE: llama.cpp picks the
        # long or the short factors once, by its context size, not per position as transformers
        # does; for this 64-position model it ran the long ones and parted at the first token)
        return
    # the same GGUF through llama.cpp (float32 weights and KV cache): greedy tokens agree until a
    # near-tie, where llama.cpp's float16 GELU table and float32 RoPE angles may decide otherwise
    llm = LLM(from_gguf)
    prompts = [ids[:5], ids[:30]]
    ours = [llm.generate(p, max_tokens=16, temperature=0, ignore_eos=True).token_ids for p in prompts]
    extra = ["-ctk", "f32", "-ctv", "f32"]
    with llama_cpp.Server(gguf_path, threads=torch.get_num_threads(), ctx=128, prefix=LLAMA_CPP, extra=extra) as s:
        theirs = [s.complete(p, 16, ignore_eos=True)["tokens"] for p in prompts]
    result = agreement(llm, prompts, ours, theirs, 16)
    for row in result["prompts"]:
        assert row["of"] == 16 and (row["agree"] == 16 or (row["theirs_rank"] == 1 and row["gap_to_theirs"] < 0.01)), (
            name,
            row,
        )


def test_what_is_not_supported_is_a_one_line_error(tmp_path):
    from gearshift.errors import GearshiftError

    path = tmp_path / "partial"
    tiny_hf(path, "phi3")
    c = json.loads((path / "config.json").read_text())
    c["partial_rotary_factor"] = 0.75  # Phi-4-mini's: RoPE on part of each head
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(GearshiftError, match="partial RoPE"):
        load(path, weights="float32", use_cache=False)
    c.update(model_type="gemma2")
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(GearshiftError, match="unsupported architecture 'gemma2'") as e:
        load(path, weights="float32", use_cache=False)
    assert "\n" not in str(e.value)
    tiny_hf(path, "gemma3")
    c = json.loads((path / "config.json").read_text())
    c["final_logit_softcapping"] = 30.0  # Gemma 2's; our logits are never capped
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(GearshiftError, match="final_logit_softcapping is not supported") as e:
        load(path, weights="float32", use_cache=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_the_fused_block_runs_qk_norm_and_gemmas_parts(name, weights, tmp_path, monkeypatch):
    """Packed weights run each block as one native op (`csrc/block.cpp`), with QK-norm, Gemma's
    post norms, GeGLU, query scale and sliding window in it: the same math as `Block.forward`
    (rounded differently, so close), and the engine's exactness (batched = alone, lookup = plain)
    holds on it."""
    from gearshift.attention import Batch, Segment

    tiny_hf(tmp_path, name, seed=5)
    llm = LLM(load(tmp_path, weights=weights, use_cache=False))
    m = llm.model
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.inference_mode():
        c1 = m.new_cache(1, 64)
        b1 = Batch([Segment(0, ids, logits_from=0)], c1)
        if not m._fused(b1):
            pytest.skip("the native kernels are not built here")
        fused = m(b1, c1)
        with monkeypatch.context() as mp:
            mp.setattr(type(m), "_fused", lambda self, b: False)
            c2 = m.new_cache(1, 64)
            plain = m(Batch([Segment(0, ids, logits_from=0)], c2), c2)
    assert torch.allclose(fused, plain, atol=1e-2, rtol=1e-2), (name, (fused - plain).abs().max())
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    prompts = [ids[:6], ids[:19], ids[:8] * 2 + ids[8:30]]
    alone = [llm.generate(p, max_tokens=16, temperature=0).token_ids for p in prompts]
    assert [c.token_ids for c in llm.generate(prompts, max_tokens=16, temperature=0)] == alone
    spec = [c.token_ids for c in llm.generate(prompts, drafter="lookup", max_tokens=16, temperature=0)]
    assert spec == alone


def test_kv_policies_are_refused_where_positions_are_not_plain(tmp_path):
    """Streaming re-rotates kept keys, which a NoPE layer never had; a window counts positions a
    policy's drops would shift: both are refused with one line, before any work."""
    from gearshift.errors import GearshiftError

    for name, kind in (("smollm3", "NoPE"), ("gemma3", "sliding-window")):
        tiny_hf(tmp_path / name, name)
        llm = LLM(load(tmp_path / name, weights="float32", use_cache=False))
        with pytest.raises(GearshiftError, match=f"does not apply to {name} \\(it has {kind} layers\\)") as e:
            llm.generate([1, 2, 3], kv_policy="streaming", kv_budget=64, max_tokens=4)
        assert "\n" not in str(e.value)


def test_distilling_a_draft_of_a_layout_export_cannot_write_is_refused(tmp_path):
    """`distill` writes a draft back in Llama's layout: for Gemma 3 (extra norms, windows) that would
    be a draft that does not load, so it is refused before any work, in one line."""
    from gearshift.errors import GearshiftError
    from gearshift.tools.distill import DistillConfig, distill

    tiny_hf(tmp_path / "gemma3", "gemma3")
    llm = LLM(load(tmp_path / "gemma3", weights="float32", use_cache=False))
    with pytest.raises(GearshiftError, match="not gemma3") as e:
        distill(llm, DistillConfig(out=tmp_path / "draft", layers=[0], prompts=["t1 t2"]))
    assert "\n" not in str(e.value) and not (tmp_path / "draft").exists()


def test_generation_config_stop_ids_end_a_completion(tmp_path):
    """Instruct models list their end-of-turn ids in generation_config.json (Llama 3.x, Gemma): the
    engine stops at them as at the config's eos."""
    tiny_hf(tmp_path, "llama")
    prompt = [3, 9, 27, 4]
    free = LLM(load(tmp_path, weights="float32", use_cache=False)).generate(prompt, max_tokens=6, temperature=0)
    assert free.finish_reason == "length"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 1, free.token_ids[2]]}))
    llm = LLM(load(tmp_path, weights="float32", use_cache=False))
    assert {VOCAB - 1, free.token_ids[2]} <= set(llm.model.cfg.eos_token_ids)
    out = llm.generate(prompt, max_tokens=6, temperature=0)
    cut = free.token_ids.index(free.token_ids[2])  # the first time that token comes (the stop is not output)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:cut]


@pytest.mark.parametrize("impl", ["native", "pytorch"])
@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_sliding_layers_hold_only_their_window(impl, weights, tmp_path, monkeypatch):
    """Gemma 3's sliding layers keep only the positions a row can still see (`KVCache.front`):
    with a window of 8 and entries moved every 5 positions, batched, lookup and tree decoding, a
    chat's next turn continued in place, a prefix loaded back from host memory and one copied from
    a busy slot all give the tokens of decoding each prompt alone with every position kept (the
    batched attention mode too, on these prompts); and the sliding layers never write a page past
    their bound."""
    from gearshift import kernels, kv_cache

    if impl == "pytorch":
        monkeypatch.setitem(kernels._state, "loaded", False)
    tiny_hf(tmp_path, "gemma3", seed=8)
    loaded = load(tmp_path, weights=weights, use_cache=False)
    g = torch.Generator().manual_seed(9)
    a, b = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (30, 25))
    prompts = [a[:17], b[:5], a[:8] * 3]

    def alone(prompt: list[int], n: int = 40) -> list[int]:
        with monkeypatch.context() as mp:
            mp.setattr(kv_cache, "MOVE_EVERY", 10**9)  # every position kept
            return LLM(loaded, prefix_cache=False).generate(prompt, max_tokens=n, temperature=0).token_ids

    monkeypatch.setattr(kv_cache, "ROLLBACK", 3)
    monkeypatch.setattr(kv_cache, "MOVE_EVERY", 5)
    llm = LLM(loaded, max_num_seqs=3, max_batched_tokens=8)
    cache = llm.core.cache
    sliding = cache.sliding
    assert sliding == [0] and cache.keep_back == 10
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    want = [alone(p) for p in prompts]
    for drafter in (None, "lookup", "hybrid"):
        got = [c.token_ids for c in llm.generate(prompts, drafter=drafter, max_tokens=40, temperature=0)]
        assert got == want, drafter
    assert min(cache.front) > 0
    bound = cache.keep_back + kv_cache.MOVE_EVERY + 8  # + one step's rows (max_batched_tokens)
    assert cache.k[sliding, :, bound:].isnan().all() and cache.v[sliding, :, bound:].isnan().all()
    assert not cache.k[1, :, : min(cache.lengths)].isnan().any()  # the global layer holds every position
    batched = LLM(loaded, max_num_seqs=3, max_batched_tokens=8, exact=False)  # (rounds differently; not at these ties)
    assert [c.token_ids for c in batched.generate(prompts, drafter="hybrid", max_tokens=40, temperature=0)] == want

    chat = LLM(loaded, max_num_seqs=1)  # one slot: a second conversation pushes the first to host memory
    first = chat.generate(a, max_tokens=30, temperature=0).token_ids
    turn = a + first + b[:6]
    second = chat.generate(turn, max_tokens=20, temperature=0)
    assert second.token_ids == alone(turn, 20) and second.stats.cached_tokens > 40  # continued in place
    assert chat.core.cache.front[0] > 0
    chat.generate(b, max_tokens=10, temperature=0)
    (saved,) = chat.core.prefix.saved.values()
    assert saved.entries.front > 0 and saved.entries.wk.shape[1] == len(saved.tokens) - saved.entries.front
    turn += second.token_ids + b[:3]
    third = chat.generate(turn, max_tokens=20, temperature=0)
    assert third.token_ids == alone(turn, 20) and third.stats.cached_tokens == len(saved.tokens)
    # a longer saved entry whose sliding layers moved on does not cover a shorter one it cannot serve:
    # a branch from the shorter one's end still finds it
    branch = LLM(loaded, max_num_seqs=1)
    t1 = a[:20] + branch.generate(a[:20], max_tokens=5, temperature=0).token_ids
    branch.generate(b[:20], max_tokens=3, temperature=0)  # t1's entries go to host memory
    branch.generate(t1 + b, max_tokens=5, temperature=0)
    branch.generate(b[:21], max_tokens=3, temperature=0)  # and t1 + b's, which slid past t1's end
    fork = branch.generate(t1 + b[:6], max_tokens=10, temperature=0)
    assert fork.stats.cached_tokens == len(t1) - 1 and fork.token_ids == alone(t1 + b[:6], 10)

    shared = [a + b + [5, 6, 7], a + b + [9, 1]]  # read 4 tokens a step: the second copies from the first
    out = LLM(loaded, max_num_seqs=2, max_batched_tokens=4).generate(shared, max_tokens=20, temperature=0)
    assert [c.token_ids for c in out] == [alone(p, 20) for p in shared]
    assert out[1].stats.cached_tokens >= 32


def test_a_rollback_past_what_the_sliding_layers_hold_is_refused(tmp_path, monkeypatch):
    from gearshift import kv_cache

    monkeypatch.setattr(kv_cache, "ROLLBACK", 3)
    monkeypatch.setattr(kv_cache, "MOVE_EVERY", 5)
    tiny_hf(tmp_path, "gemma3")
    m = load(tmp_path, weights="float32", use_cache=False).model
    cache = m.new_cache(1, 64)
    m.run(list(range(1, 31)), cache)
    m.run([7], cache)  # slides: the window of 8 and 3 more stay before the next row
    assert cache.front[0] == 30 - cache.keep_back == 20
    with pytest.raises(ValueError, match="hold positions 20 on only"):
        cache.rollback(0, 26)
    cache.rollback(0, 27)  # the next row, at 27, sees 20..27
    cache.rollback(0, 0)
    assert cache.front[0] == 0
