"""Correctness of gearshift, with transformers as the reference implementation.

Stated tolerance: in float32 (`weights="float32"`, the exact mode) gearshift's logits must equal
transformers' float32 logits to TOL = 1e-4, absolute, on every position and vocabulary entry (no
relative slack; measured differences are 1e-5 to 3e-5). The random test models are initialised
with a large spread so their logits have a standard deviation of about 2 (checked by
`assert_nontrivial`): an error in any weight, norm, RoPE frequency or mask moves them far beyond
that tolerance.

  (a) tiny random Llama / Qwen2 checkpoints written by transformers (`save_pretrained`, safetensors,
      one of them sharded): logits, incremental decoding through the KV cache, batched generation;
  (b) tiny GGUF files written here with gguf-py in many tensor types, loaded by transformers
      (`from_pretrained(..., gguf_file=...)`) as the reference;
  (c) the default model (SmolLM2-135M-Instruct, Q4_1 GGUF): greedy 64-token continuations equal to
      transformers' `generate` on the same file;
  (d) the default model's tokenizer and chat template against transformers' `AutoTokenizer`.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

import gearshift
from gearshift import LLM, hub
from gearshift.attention import Batch, Segment
from gearshift.loading import load
from gearshift.model import rope_inv_freq
from tiny import TINY_DIMS, randomize

TOL = 1e-4  # the stated tolerance: max |logit difference| against transformers, float32
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    assert torch.isfinite(expected).all()
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.3g} exceeds the stated tolerance {TOL}"


def assert_nontrivial(logits: torch.Tensor) -> None:
    """The reference logits must spread far beyond TOL, or matching them would prove nothing."""
    assert logits.std().item() > 1.0, f"reference logits too flat (std {logits.std().item():.3g})"


# ------------------------------------------------------------------ a tiny byte-level BPE tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
WORDS = [
    "the",
    " the",
    " and",
    "ing",
    " hello",
    " world",
    " quick",
    " brown",
    " fox",
    "er",
    " a",
    " of",
    "in",
    " to",
    " lazy",
    " dog",
]
# ChatML, laid out the way real templates are (block tags on their own, indented lines), so the
# rendering depends on jinja's trim_blocks/lstrip_blocks exactly as transformers sets them
CHATML = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' and not loop.first %}
        {{ raise_exception('the system message must come first') }}
    {% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@lru_cache(maxsize=None)
def tiny_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Tokens (3 specials, the 256 byte symbols, merged words) and merges, GPT-2 byte spelling."""
    b2u = bytes_to_unicode()
    tokens = list(SPECIALS) + [b2u[b] for b in range(256)]
    merges = []
    for word in WORDS:
        s = "".join(b2u[b] for b in word.encode())
        for i in range(1, len(s)):
            if s[: i + 1] not in tokens:
                merges.append(f"{s[:i]} {s[i]}")
                tokens.append(s[: i + 1])
    return tuple(tokens), tuple(merges)


VOCAB = len(tiny_vocab()[0])


def write_tiny_tokenizer(directory: Path) -> None:
    tokens, merges = tiny_vocab()
    tok = HFTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML})
    )


# ------------------------------------------------------------------ tiny random transformers models

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama-gqa": dict(arch="llama", layers=2),
    "llama3-rope": dict(arch="llama", layers=3, rope_scaling=LLAMA3_ROPE),
    "llama-tied-sharded": dict(arch="llama", layers=2, tie=True, shard="40KB"),
    "qwen2-bias": dict(arch="qwen2", layers=2),
    # head_dim set apart from hidden/heads (as Mistral-Nemo, Qwen3 do), with linear RoPE scaling
    "llama-headdim32-linear-rope": dict(
        arch="llama", layers=2, head_dim=32, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}


@lru_cache(maxsize=None)
def hf_model(variant: str):
    """The variant's transformers model (hidden 64, 4 heads over 2 KV heads), random weights."""
    spec = VARIANTS[variant]
    cls = LlamaConfig if spec["arch"] == "llama" else Qwen2Config
    extra = {k: spec[k] for k in ("rope_scaling", "head_dim", "attention_bias", "mlp_bias") if k in spec}
    cfg = cls(
        vocab_size=VOCAB,
        **TINY_DIMS,
        num_hidden_layers=spec["layers"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.get("tie", False),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed=sorted(VARIANTS).index(variant) + 1)
    assert all(getattr(cfg, k) == v for k, v in extra.items() if k != "rope_scaling")
    if spec.get("tie"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens (compared greedily)
    return model.eval()


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


@torch.no_grad()
def gs_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of every position of every row [B, S, V]: the rows as sequences in one batched forward."""
    b, s = tokens.shape
    cache = model.new_cache(b, s)
    with torch.no_grad():
        out = model(Batch([Segment(r, tokens[r].tolist(), logits_from=0) for r in range(b)], cache), cache)
    return out.view(b, s, -1)


def random_tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """A tiny model saved by transformers, and gearshift's float32 load of that directory."""
    spec = VARIANTS[request.param]
    ref = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    if "shard" in spec:
        ref.save_pretrained(path, max_shard_size=spec["shard"])
    else:
        ref.save_pretrained(path)
    write_tiny_tokenizer(path)
    return SimpleNamespace(
        name=request.param,
        spec=spec,
        ref=ref,
        path=path,
        gs=load(path, weights="float32", device="cpu", use_cache=False),
    )


def test_hf_checkpoint_logits_match_transformers(tiny):
    files = sorted(tiny.path.glob("*.safetensors"))
    assert len(files) > 1 if "shard" in tiny.spec else len(files) == 1
    cfg = tiny.gs.model.cfg
    assert (cfg.arch, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (tiny.spec["arch"], 4, 2, VOCAB)
    assert cfg.head_dim == tiny.spec.get("head_dim", 16)
    assert cfg.tie_embeddings == tiny.spec.get("tie", False)
    assert cfg.qkv_bias == (tiny.spec["arch"] == "qwen2")
    tokens = random_tokens(2, 96, VOCAB, seed=1)  # 96 > original_max_position_embeddings of llama3-rope
    expected = hf_logits(tiny.ref, tokens)
    assert_nontrivial(expected)
    assert_logits_close(gs_logits(tiny.gs.model, tokens), expected)


@pytest.mark.parametrize("tiny", ["llama3-rope"], indirect=True)
def test_llama3_rope_scaling_is_applied(tiny):
    """The llama3 variant's match above is meaningful: without the scaling the logits differ."""
    model = tiny.gs.model
    assert model.cfg.rope_scaling["rope_type"] == "llama3"
    tokens = random_tokens(1, 96, VOCAB, seed=2)
    scaled = gs_logits(model, tokens)
    saved = model.inv_freq
    try:
        model.inv_freq = rope_inv_freq(dataclasses.replace(model.cfg, rope_scaling=None))
        unscaled = gs_logits(model, tokens)
    finally:
        model.inv_freq = saved
    assert (scaled - unscaled).abs().max().item() > 100 * TOL
    assert_logits_close(scaled, hf_logits(tiny.ref, tokens))


def test_incremental_decode_matches_full_sequence(tiny):
    """Prefill, then chunks of 1..k tokens through the KV cache, equal the one-shot forward; a
    rollback (what speculative decoding does) followed by other tokens equals their fresh forward."""
    model, n = tiny.gs.model, 48
    tokens = random_tokens(1, n, VOCAB, seed=3)
    full = gs_logits(model, tokens)
    cache = model.new_cache(1, n)
    parts, pos = [], 0
    with torch.no_grad():
        for size in [11, 1, 1, 4, 1, 1, 7, 1, 2, 1, 1, 1, 16]:
            parts.append(model.run(tokens[0, pos : pos + size], cache))
            pos += size
            assert cache.lengths[0] == pos
    assert pos == n
    incremental = torch.cat(parts)[None]
    assert_logits_close(incremental, full)
    assert_logits_close(incremental, hf_logits(tiny.ref, tokens))

    other = tokens.clone()
    other[:, 30:] = random_tokens(1, n - 30, VOCAB, seed=4)
    cache.rollback(0, 30)
    with torch.no_grad():
        tail = torch.cat([model.run(other[0, 30:31], cache), model.run(other[0, 31:], cache)])[None]
    assert_logits_close(tail, hf_logits(tiny.ref, other)[:, 30:])


PROMPTS = [
    " hello world",
    "the quick brown fox jumps over the lazy dog, and the end",
    "a",
    "<|im_start|>user\nhello<|im_end|>\n",
    " of the brown and the quick",
]


def test_batched_generate_equals_single_and_transformers(tiny):
    """A left-padded batch decodes exactly like each prompt alone, and each alone like transformers."""
    llm = LLM(tiny.gs)
    n = 12
    lengths = {len(llm.encode(p)) for p in PROMPTS}
    assert len(lengths) >= 3  # prompts of different lengths, so the batch really is padded
    batched = llm.generate(PROMPTS, max_tokens=n, ignore_eos=True)
    assert isinstance(batched, list) and len(batched) == len(PROMPTS)
    for prompt, b in zip(PROMPTS, batched):
        single = llm.generate(prompt, max_tokens=n, ignore_eos=True)
        ids = llm.encode(prompt)
        with torch.no_grad():
            out = tiny.ref.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=n,
            )
        expected = out[0, len(ids) :].tolist()
        assert len(expected) == n
        assert single.token_ids == expected, prompt
        assert b.token_ids == single.token_ids, prompt
        assert b.text == single.text
        # a random model emits stray UTF-8 bytes: streamed text, flushed at the end, is the full decode
        assert b.text == llm.tokenizer.decode(expected)
        assert b.prompt_tokens == single.prompt_tokens == len(ids)


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_biases_are_loaded(bias, tmp_path):
    """LlamaConfig(attention_bias=True) also gives o_proj a bias; mlp_bias=True gives gate/up/down
    one. Loading such a checkpoint must reproduce transformers."""
    cfg = LlamaConfig(vocab_size=VOCAB, **TINY_DIMS, num_hidden_layers=2, **{bias: True})
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    randomize(ref, seed=11)
    ref.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    got = load(tmp_path, weights="float32", device="cpu", use_cache=False)
    tokens = random_tokens(1, 24, VOCAB, seed=12)
    assert_logits_close(gs_logits(got.model, tokens), hf_logits(ref.eval(), tokens))


# ------------------------------------------------------------------ tiny GGUF files

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{GGUF_LAYER_NAMES[rest]}.{suffix}"
    return f"{GGUF_TOP_NAMES[base]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (rows of q/k, for its RoPE layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(a: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT | None]:
    if qtype == QT.F32:
        return a.astype(np.float32), None
    if qtype == QT.F16:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a.astype(np.float32), qtype), qtype


def gguf_tensors_from_hf(model, arch: str, qtype_for) -> dict[str, tuple[np.ndarray, QT | None]]:
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        g = gguf_name(name)
        a = t.detach().float().numpy().copy()
        if arch == "llama" and ".attn_q." in g:
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in g:
            a = llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        # norms and biases stay F32, as llama.cpp writes them
        out[g] = (a.astype(np.float32), None) if a.ndim == 1 else encode_tensor(a, qtype_for(g))
    return out


def write_gguf(path: Path, arch: str, hp: dict, tensors: dict[str, tuple[np.ndarray, QT | None]]) -> Path:
    tokens, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(256)
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["intermediate"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_dimension_count(hp["hidden"] // hp["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(tokens))
    w.add_token_types([int(gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL) for t in tokens])
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hparams(model) -> dict:
    c = model.config
    return dict(
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        intermediate=c.intermediate_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
    )


MIXED = {
    "token_embd": QT.Q4_1,
    "output": QT.Q8_0,
    "attn_q": QT.Q4_0,
    "attn_k": QT.Q4_1,
    "attn_v": QT.Q8_0,
    "attn_output": QT.F16,
    "ffn_gate": QT.Q5_0,
    "ffn_up": QT.Q5_1,
    "ffn_down": QT.BF16,
}


def mixed_type(name: str) -> QT:
    return MIXED[name.split(".")[-2]]


# case -> (source variant, arch written to the file, tensor type per 2-D tensor)
GGUF_CASES = {
    **{
        t: ("llama-gqa", "llama", lambda _, t=t: QT[t])
        for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
    },
    "mixed": ("llama-gqa", "llama", mixed_type),
    "Q8_0-tied": ("llama-tied-sharded", "llama", lambda _: QT.Q8_0),
    "qwen2-Q4_1": ("qwen2-bias", "qwen2", lambda _: QT.Q4_1),
}


def reference_from_gguf(path: Path):
    """transformers' own GGUF loader (it dequantizes to float32 and un-permutes q/k)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_logits_match_transformers(case, tmp_path):
    variant, arch, qtype_for = GGUF_CASES[case]
    src = hf_model(variant)
    path = write_gguf(tmp_path / f"tiny-{case}.gguf", arch, hparams(src), gguf_tensors_from_hf(src, arch, qtype_for))
    ref = reference_from_gguf(path)
    assert ref.config.model_type == arch and ref.config.tie_word_embeddings == ("tied" in case)
    got = load(path, weights="float32", device="cpu", use_cache=False)
    cfg = got.model.cfg
    assert (cfg.arch, cfg.vocab_size, cfg.n_kv_heads, cfg.tie_embeddings) == (arch, VOCAB, 2, "tied" in case)
    assert cfg.qkv_bias == (arch == "qwen2")
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, [2])
    tokens = random_tokens(2, 40, VOCAB, seed=5)
    expected = hf_logits(ref, tokens)
    assert_nontrivial(expected)
    assert_logits_close(gs_logits(got.model, tokens), expected)
    if case == "F32":  # lossless file: also equal to the source model the file was written from
        assert_logits_close(expected, hf_logits(src, tokens))


def random_kquant_rows(rows: int, cols: int, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant blocks (gguf-py cannot quantize to these): random bits, sane fp16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)

    def f16(lo, hi):
        return (
            rng.uniform(lo, hi, size=(rows, cols // block))
            .astype(np.float16)
            .view(np.uint8)
            .reshape(rows, cols // block, 2)
        )

    if qtype == QT.Q6_K:  # ql, qh, int8 scales, then d
        data[..., 208:210] = f16(5e-5, 2e-4)
    else:  # Q4_K / Q5_K: d, dmin, packed 6-bit scales/mins, (qh), qs
        scale = 7e-4 if qtype == QT.Q4_K else 3e-4
        data[..., 0:2] = f16(0.5 * scale, 1.5 * scale)
        data[..., 2:4] = f16(0.5 * scale, 1.5 * scale)
    return data.reshape(rows, -1)


def test_gguf_kquants_match_transformers(tmp_path):
    """Q4_K / Q5_K / Q6_K tensors (block size 256, so a 256-wide model), random valid blocks."""
    hp = dict(hidden=256, layers=2, intermediate=256, heads=4, kv_heads=2)
    rng = np.random.default_rng(7)
    kinds = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
    shapes = {"token_embd": (VOCAB, 256), "output": (VOCAB, 256)}
    for i in range(hp["layers"]):
        shapes.update(
            {
                f"blk.{i}.attn_q": (256, 256),
                f"blk.{i}.attn_k": (128, 256),
                f"blk.{i}.attn_v": (128, 256),
                f"blk.{i}.attn_output": (256, 256),
                f"blk.{i}.ffn_gate": (256, 256),
                f"blk.{i}.ffn_up": (256, 256),
                f"blk.{i}.ffn_down": (256, 256),
            }
        )
    tensors = {}
    for j, (name, (rows, cols)) in enumerate(shapes.items()):
        qt = QT.Q6_K if name == "output" else kinds[j % 3]
        tensors[f"{name}.weight"] = (random_kquant_rows(rows, cols, qt, rng), qt)
    for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(hp["layers"]) for n in ("attn_norm", "ffn_norm")]:
        tensors[f"{name}.weight"] = ((1 + 0.3 * rng.standard_normal(256)).astype(np.float32), None)
    path = write_gguf(tmp_path / "tiny-kquants.gguf", "llama", hp, tensors)
    ref = reference_from_gguf(path)
    got = load(path, weights="float32", device="cpu", use_cache=False)
    tokens = random_tokens(2, 40, VOCAB, seed=6)
    expected = hf_logits(ref, tokens)
    assert_nontrivial(expected)
    assert_logits_close(gs_logits(got.model, tokens), expected)


def llama_cpp_rope_factors(cfg) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py: Llama 3 RoPE scaling written as the `rope_freqs` tensor."""
    sc = cfg.rope_parameters
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (sc["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi, old = (
        sc["factor"],
        sc["low_freq_factor"],
        sc["high_freq_factor"],
        sc["original_max_position_embeddings"],
    )
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_freqs_and_conversion_cache(tmp_path, monkeypatch):
    """A Llama 3 GGUF carries its RoPE scaling as `rope_freqs`, which transformers' GGUF loader
    ignores, so the reference here is the transformers model the lossless (F32) file was written
    from. The same file loaded twice through the conversion cache gives identical logits."""
    monkeypatch.setenv("GEARSHIFT_HOME", str(tmp_path / "home"))
    src = hf_model("llama3-rope")
    tensors = gguf_tensors_from_hf(src, "llama", lambda _: QT.F32)
    tensors["rope_freqs.weight"] = (llama_cpp_rope_factors(src.config), None)
    path = write_gguf(tmp_path / "tiny-llama3.gguf", "llama", hparams(src), tensors)
    tokens = random_tokens(2, 96, VOCAB, seed=8)
    expected = hf_logits(src, tokens)
    cold = load(path, weights="float32", device="cpu")
    warm = load(path, weights="float32", device="cpu")
    assert (cold.cached, warm.cached) == (False, True)
    assert cold.model.cfg.rope_scaling["rope_type"] == "freq_factors"
    got = gs_logits(cold.model, tokens)
    assert_logits_close(got, expected)
    assert torch.equal(gs_logits(warm.model, tokens), got)
    text = "<|im_start|>user\n the quick brown fox<|im_end|>\n"
    assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
    assert warm.tokenizer.chat_template == cold.tokenizer.chat_template == CHATML


def test_gguf_tokenizer_matches_transformers(tmp_path):
    """The tiny GGUF's tokenizer, as gearshift and transformers read it from the file."""
    src = hf_model("llama-gqa")
    path = write_gguf(
        tmp_path / "tiny-tok.gguf", "llama", hparams(src), gguf_tensors_from_hf(src, "llama", lambda _: QT.Q8_0)
    )
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = load(path, weights="float32", device="cpu", use_cache=False).tokenizer
    for text in PROMPTS + ["  the  lazy\n\ndog  ", "naïve 😀 <|endoftext|>x"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text
    assert tok.encode(" hello world the")[:2] == [tiny_vocab()[0].index("Ġhello"), tiny_vocab()[0].index("Ġworld")]
    chats = {  # messages -> the rendering (without the generation prompt)
        "<|im_start|>\n<|im_start|>user\nhi<|im_end|>\n": [{"role": "user", "content": "hi"}],
        "<|im_start|>\n<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nthe fox?<|im_end|>\n": [
            {"role": "system", "content": " be brief "},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "the fox?"},
        ],
    }
    for rendered, msgs in chats.items():
        for gen in (True, False):
            text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert text == rendered + ("<|im_start|>assistant\n" if gen else "")


# ------------------------------------------------------------------ the default model


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return hub.pull(quiet=True)


@pytest.fixture(scope="module")
def smol_ref_tokenizer(smol_path):
    return AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def smol_ref_model(smol_path):
    model = AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # always exactly max_new_tokens; EOS is compared below
    return model


@pytest.fixture(scope="module")
def smol_llm(smol_path):
    return gearshift.load(smol_path, weights="float32", device="cpu")


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_default_model_greedy_matches_transformers(chat, smol_llm, smol_ref_model, smol_ref_tokenizer):
    """64 greedy tokens, both sides continuing past EOS (gearshift: ignore_eos; transformers: no EOS
    stopping), so every step is compared; then gearshift with EOS on stops exactly at the first EOS."""
    messages, n = CHATS[chat], 64
    ids = smol_ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert smol_llm.encode(messages) == ids
    with torch.no_grad():
        out = smol_ref_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
        )
    expected = out[0, len(ids) :].tolist()
    assert len(expected) == n

    got = smol_llm.generate(messages, max_tokens=n, ignore_eos=True)
    first_diff = next((i for i, (a, b) in enumerate(zip(got.token_ids, expected)) if a != b), None)
    assert got.token_ids == expected, (
        f"diverges at token {first_diff}:\n gearshift:    {got.text!r}\n transformers: "
        f"{smol_ref_tokenizer.decode(expected, skip_special_tokens=True)!r}"
    )
    assert got.text == smol_ref_tokenizer.decode(expected, skip_special_tokens=True)
    assert (got.prompt_tokens, got.finish_reason) == (len(ids), "length")

    eos = smol_ref_tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = expected.index(eos) if eos in expected else n
    stopped = smol_llm.generate(messages, max_tokens=n)
    assert stopped.token_ids == expected[:stop]
    assert stopped.finish_reason == ("stop" if stop < n else "length")
    assert stopped.text == smol_ref_tokenizer.decode(expected[:stop], skip_special_tokens=True)


TEXTS = [
    "Hello, world!",
    "  leading,   multiple   spaces,\t\ttabs\n\n\nnewlines and trailing   ",
    "\u00dcn\u00efc\u00f6d\u00e9 \u2013 \u201cquotes\u201d \u2014 na\u00efve caf\u00e9, e\u0301 (combining), \u00a0nbsp",  # noqa: E501
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0 \u4e2d\u6587 \ud55c\uad6d\uc5b4 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947",  # noqa: E501
    "emoji \U0001f600\U0001f680 family \U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 flag \U0001f1eb\U0001f1f7",  # noqa: E501
    "def f(x):\n    return {'a': x ** 2}  # comment\n\tif x != 0: pass\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>",
    "1234567890 3.14159 -1e-5 0x1F 1,000,000",
    "don't I'll we've THEY'RE",
    "",
    " ",
    "\n",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_default_tokenizer_matches_transformers(text, smol_llm, smol_ref_tokenizer):
    tok, ref = smol_llm.tokenizer, smol_ref_tokenizer
    for special in (True, False):
        ids = tok.encode(text, add_special_tokens=special)
        assert ids == ref.encode(text, add_special_tokens=special)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly
    if "<|im_start|>" in text:
        assert tok.token_id("<|im_start|>") in ids  # special tokens stay whole


def test_default_tokenizer_special_tokens(smol_llm, smol_ref_tokenizer):
    tok, ref = smol_llm.tokenizer, smol_ref_tokenizer
    assert (tok.bos_token, tok.eos_token) == (ref.bos_token, ref.eos_token)
    assert tok.eos_id == ref.eos_token_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.vocab_size == len(ref)
    assert smol_llm.eos_ids == {ref.eos_token_id}
    assert tok.encode("<|im_start|>user") == ref.encode("<|im_start|>user") == [1] + ref.encode("user")


CHAT_CASES = {
    "single-turn": [{"role": "user", "content": "Hi there"}],
    "multi-turn-system": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? \U0001f914\n  (show work)"},
    ],
    "multi-turn-no-system": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_default_chat_template_matches_transformers(case, add_generation_prompt, smol_llm, smol_ref_tokenizer):
    messages = CHAT_CASES[case]
    expected = smol_ref_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = smol_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert smol_llm.tokenizer.encode_chat(messages, add_generation_prompt) == smol_ref_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


def test_a_q8_0_embedding_table_stays_in_its_blocks(llm):
    """The default model's token_embd is Q8_0: the model keeps its int8 codes and a scale per 32
    values (a quarter of float32's memory), and every row it makes is the file's dequantized row,
    bit for bit. A table with one value off its block's grid, or a float one, stays float."""
    from gearshift.loading import q8_0_blocks, read_checkpoint

    m = llm.model
    assert m.fmts["embed"] == "q8_0" and m.embed is None and m.embed_q.dtype == torch.int8
    ck = read_checkpoint(llm.loaded.path)
    ref = ck.tensors["model.embed_tokens.weight"]
    assert torch.equal(m.embed_rows(torch.arange(len(ref))), ref)
    off = ref.clone()
    off[5, 7] = torch.nextafter(off[5, 7], torch.tensor(float("inf")))
    assert q8_0_blocks(ref) is not None and q8_0_blocks(off) is None
    assert q8_0_blocks(torch.randn(4, 64, generator=torch.Generator().manual_seed(0))) is None
