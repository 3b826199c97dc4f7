"""Read GGUF files and Hugging Face directories into one in-memory form, then build a model.

Everything funnels through `Checkpoint` (a config, float32 tensors under Hugging Face names, and a
tokenizer directory), so GGUF and safetensors share one model-building path. Turning a GGUF file
into packed runtime weights costs seconds (dequantize, requantize, convert the tokenizer), so the
result is cached under $GEARSHIFT_HOME/converted, written to a temporary directory and renamed
into place, keyed by the file's identity and the chosen formats.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import hub
from .errors import GearshiftError
from .model import FORMATS, Q8_0_BLOCK, ExitHead, ModelConfig, Transformer, interleave_rope_rows
from .tokenizer import Tokenizer

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "smollm3")
SMOLLM3_NOPE_INTERVAL = 4  # every fourth layer has no RoPE (llama.cpp's fixed step for SmolLM3 GGUFs)
CACHE_VERSION = 12
GEMMA3_SLIDING_PATTERN = 6  # every sixth layer is global (llama.cpp's default when a GGUF gives no pattern)

# Gemma's turn format, for a Gemma file that carries no template of its own (the base model's GGUF):
# a system message opens the first user turn, the assistant's role is "model"
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ns.system + m['content'] | trim }}<end_of_turn>\n{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # Hugging Face names, float32
    bits: dict[str, float]  # precision each tensor had on disk (4 for Q4_1, 16 for bf16, ...)
    tokenizer_dir: Path
    quantization: str


# ---------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3's fused q/k/v (split by `_split_fused`)
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3 normalizes before and after both attention and MLP; Hugging Face's names differ from Llama's
GEMMA3_NAMES = {
    **GGUF_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _hf_name(gguf_name: str, arch: str) -> str | None:
    names = GEMMA3_NAMES if arch == "gemma3" else GGUF_NAMES
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base = names.get(parts[2])
        return base and f"model.layers.{parts[1]}.{base}.{parts[3]}"
    base = names.get(parts[0])
    return base and f"{base}.{parts[1]}"


def _split_fused(tensors: dict, bits: dict, cfg: ModelConfig) -> None:
    """Phi-3 keeps q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj`: split them into the
    Llama names (the model fuses them again its own way)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for fused, names, sizes in (
            ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), (q, kv, kv)),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), (cfg.hidden_dim, cfg.hidden_dim)),
        ):
            for kind in ("weight", "bias"):
                key = f"{p}{fused}.{kind}"
                if key in tensors:
                    for name, part in zip(names, tensors.pop(key).split(list(sizes))):
                        tensors[f"{p}{name}.{kind}"], bits[f"{p}{name}.{kind}"] = part.contiguous(), bits[key]
                    bits.pop(key)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved for its RoPE; undo it for rotate-half RoPE."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path: Path) -> Checkpoint:
    import gguf

    if not _is_gguf(path):
        raise GearshiftError(f"{path} is not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        for t in reader.tensors:  # a truncated file leaves tensors pointing past its end
            if t.data_offset + t.n_bytes > path.stat().st_size:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
    except GearshiftError:
        raise
    except Exception as e:
        raise GearshiftError(f"{path} is not a readable GGUF file (truncated or corrupt): {e}") from None
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise GearshiftError(f"unsupported architecture {arch!r} in {path.name}; gearshift runs {', '.join(SUPPORTED)}")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    n_heads = a("attention.head_count")
    n_kv = a("attention.head_count_kv", n_heads)
    dim = a("embedding_length")
    names = {t.name for t in reader.tensors}
    tok_field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    eos = [tok_field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    cfg = ModelConfig(
        arch=arch,
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        dim=dim,
        hidden_dim=a("feed_forward_length"),
        n_layers=a("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=a("attention.key_length", dim // n_heads),
        norm_eps=a("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=a("rope.freq_base", 10000.0),
        max_seq_len=a("context_length", 4096),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=tok_field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({i for i in eos if i is not None}),
    )
    if arch == "gemma3":
        _gguf_gemma3(cfg, a, reader)
    if arch == "smollm3":
        cfg.no_rope = [i for i in range(cfg.n_layers) if (i + 1) % SMOLLM3_NOPE_INTERVAL == 0]
    scaling = a("rope.scaling.type")
    if scaling == "linear":
        cfg.rope_scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise GearshiftError(f"unsupported RoPE scaling {scaling!r} in {path.name}")
    tensors, bits, counts, longrope = {}, {}, {}, {}
    for t in reader.tensors:
        qtype = t.tensor_type
        arr = gguf.quants.dequantize(t.data, qtype).astype(np.float32, copy=False)
        arr = arr.reshape(tuple(reversed([int(d) for d in t.shape])))
        if t.name == "rope_freqs.weight":
            cfg.rope_scaling = {"rope_type": "freq_factors", "factors": arr.tolist()}
            continue
        if t.name in ("rope_factors_short.weight", "rope_factors_long.weight"):  # Phi-3-*-128k's LongRoPE
            longrope[t.name.split(".")[0].removeprefix("rope_factors_") + "_factor"] = arr.tolist()
            continue
        name = _hf_name(t.name, arch)
        if arch == "phi3" and t.name.endswith("ffn_up.weight"):  # gate and up, fused
            name = name.replace("mlp.up_proj", "mlp.gate_up_proj")
        if name is None:
            raise GearshiftError(f"unexpected tensor {t.name} in {path.name}")
        if arch not in ("qwen2", "qwen3", "phi3", "gemma3") and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            arr = _unpermute(arr, n_heads if t.name.split(".")[-2] == "attn_q" else n_kv)
        tensors[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
        bits[name] = _gguf_bits(qtype)
        if arr.ndim == 2:
            counts[qtype.name] = counts.get(qtype.name, 0) + arr.size
    if arch == "phi3":
        _split_fused(tensors, bits, cfg)
    if longrope:  # as the HF reader takes it: the short factors, within the pretraining length
        if "short_factor" not in longrope or not a("rope.scaling.original_context_length"):
            raise GearshiftError(f"{path.name} has LongRoPE factors without rope_factors_short or its original length")
        longrope["original_max_position_embeddings"] = a("rope.scaling.original_context_length")
        longrope["attention_factor"] = a("rope.scaling.attn_factor")
        cfg.rope_scaling, cfg.max_seq_len = _longrope({}, longrope, cfg.max_seq_len)
    tok_dir = Path(tempfile.mkdtemp(prefix="gearshift-tok-"))
    _convert_gguf_tokenizer(path, tok_dir)
    if arch == "gemma3" and not (tok_dir / "chat_template.jinja").exists():
        config = json.loads((tok_dir / "tokenizer_config.json").read_text())
        if not config.get("chat_template"):
            (tok_dir / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    return Checkpoint(cfg, tensors, bits, tok_dir, max(counts, key=counts.get))


def _gguf_gemma3(cfg: ModelConfig, a, reader) -> None:
    """Gemma 3's settings as llama.cpp reads them from a GGUF: the window, every sixth layer global
    (unless the file gives the pattern), a RoPE base of 10000 in the sliding layers, norms whose
    weights already include Gemma's +1, and `<end_of_turn>` as a stop token."""
    pattern = a("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: true where the layer slides
        sliding = [bool(x) for x in pattern]
    else:
        every = int(pattern or GEMMA3_SLIDING_PATTERN)
        sliding = [(i + 1) % every != 0 for i in range(cfg.n_layers)]
    cfg.layer_types = ["sliding_attention" if x else "full_attention" for x in sliding]
    cfg.sliding_window = a("attention.sliding_window")
    cfg.rope_local_theta = 10000.0
    cfg.post_norms, cfg.act, cfg.embed_scale = True, "gelu_tanh", cfg.dim**0.5
    if cfg.n_layers == 62:  # llama.cpp: Gemma 3 27B scales queries by the model dim per head, not head_dim
        cfg.attn_scale = (cfg.dim / cfg.n_heads) ** -0.5
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if a(key):
            raise GearshiftError(f"{key} is not supported (gemma3 with {key} = {a(key)})")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if "<end_of_turn>" in tokens:
        cfg.eos_token_ids = sorted({*cfg.eos_token_ids, tokens.index("<end_of_turn>")})


def _gguf_bits(qtype) -> float:
    name = qtype.name
    if name in ("F32",):
        return 32
    if name in ("F16", "BF16"):
        return 16
    digits = [c for c in name if c.isdigit()]
    return float(digits[0]) if digits else 8


# Architectures whose GGUF transformers does not read yet, though their tokenizer and metadata are
# Llama's: their tokenizer is read as Llama's
GGUF_READ_AS_LLAMA = ("smollm3",)


def _convert_gguf_tokenizer(path: Path, out: Path) -> None:
    """Let transformers build the fast tokenizer from GGUF metadata once; we keep its files."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    transformers.logging.set_verbosity_error()
    mapping = gguf_utils.GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for arch in GGUF_READ_AS_LLAMA:
        if arch not in gguf_utils.GGUF_SUPPORTED_ARCHITECTURES and "llama" in mapping:
            mapping[arch] = mapping["llama"]
            gguf_utils.GGUF_SUPPORTED_ARCHITECTURES.append(arch)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GearshiftError(f"cannot read the tokenizer in {path.name}: {e}") from None
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------- Hugging Face directories


def read_hf(path: Path) -> Checkpoint:
    from safetensors import safe_open

    if not (path / "config.json").exists():
        raise GearshiftError(f"{path} has no config.json (expected a Hugging Face model directory)")
    c = json.loads((path / "config.json").read_text())
    arch = c.get("model_type")
    if arch == "gemma3" and "text_config" in c:
        raise GearshiftError(f"{path} is a multimodal Gemma 3 checkpoint; gearshift runs Gemma 3's text models")
    if arch == "gemma3_text":  # Gemma3ForCausalLM's config: ours is the text model of any Gemma 3
        arch = "gemma3"
    if arch not in SUPPORTED:
        raise GearshiftError(f"unsupported architecture {arch!r} in {path}; gearshift runs {', '.join(SUPPORTED)}")
    rope = c.get("rope_parameters") or {}
    gemma = _hf_gemma3(c, path) if arch == "gemma3" else {}
    if gemma:
        rope = rope.get("full_attention", rope)
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise GearshiftError(f"unsupported RoPE scaling {kind!r} in {path}")
    eos = c.get("eos_token_id")
    n_heads = c["num_attention_heads"]
    max_len = c.get("max_position_embeddings", 4096)
    if kind == "longrope":
        scaling, max_len = _longrope(c, scaling, max_len)
    if (c.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0) != 1.0:
        raise GearshiftError(f"partial RoPE (partial_rotary_factor) in {path} is not supported")
    if c.get("sliding_window") and c.get("use_sliding_window", arch in ("mistral", "phi3")):
        max_len = min(max_len, c["sliding_window"])  # beyond the window our full attention would differ
    cfg = ModelConfig(
        arch=arch,
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=max_len,
        tie_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=arch == "qwen2" or c.get("attention_bias", False),
        bos_token_id=c.get("bos_token_id"),
        o_bias=arch != "qwen2" and c.get("attention_bias", False),
        mlp_bias=c.get("mlp_bias", False),
        qk_norm=arch in ("qwen3", "gemma3"),
        eos_token_ids=_stop_ids(eos, path),
        **gemma,
    )
    if arch == "smollm3":  # no_rope_layers: 1 where the layer takes RoPE, 0 where it has none
        flags = c.get("no_rope_layers") or [
            int((i + 1) % c.get("no_rope_layer_interval", SMOLLM3_NOPE_INTERVAL) != 0) for i in range(cfg.n_layers)
        ]
        cfg.no_rope = [i for i, use in enumerate(flags) if not use]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GearshiftError(f"no *.safetensors files in {path}")
    tensors, bits = {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                bits[name] = t.element_size() * 8
                tensors[name] = t.float()
    if not tensors:
        raise GearshiftError(f"no tensors in the safetensors files of {path}")
    if arch == "phi3":
        _split_fused(tensors, bits, cfg)
    if arch == "gemma3":  # Gemma's norms scale by 1 + weight (GGUF files store the sum)
        for name in tensors:
            if name.endswith("norm.weight"):
                tensors[name] = tensors[name] + 1.0
    quantization = f"{int(max(bits.values()))}-bit float"
    if shared := c.get("gearshift_shared"):  # a distilled draft: embeddings and LM head live in its target
        base_path = Path(shared["base"])
        if not base_path.exists():
            raise GearshiftError(f"{path} shares weights with {base_path}, which does not exist")
        base = read_checkpoint(base_path)
        for name in shared["tensors"]:
            tensors[name], bits[name] = base.tensors[name], base.bits[name]
        quantization += f" + shared from {base_path.name}"
    return Checkpoint(cfg, tensors, bits, path, quantization)


def _stop_ids(eos, path: Path) -> list[int]:
    """The config's end-of-sequence ids and generation_config.json's: instruct models list their
    end-of-turn tokens there (Llama 3.x's <|eot_id|>, Gemma's <end_of_turn>), not in config.json."""
    ids: set[int] = set()
    gen = path / "generation_config.json"
    extra = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    for value in (eos, extra):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return sorted(ids)


def _longrope(c: dict, scaling: dict, max_len: int) -> tuple[dict, int]:
    """Phi-3's LongRoPE as transformers computes it up to the pretraining length: the short
    factors, and cos/sin scaled by the attention factor. Past that length transformers switches every
    position to the long factors, which a cache of keys rotated once cannot follow, so the context
    stops there (as a sliding window caps Mistral's)."""
    original = scaling.get("original_max_position_embeddings") or c.get("original_max_position_embeddings") or max_len
    factor = scaling.get("factor") or max_len / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = {"rope_type": "longrope", "short_factor": list(scaling["short_factor"]), "attention_factor": attention}
    return short, min(max_len, original)


def _hf_gemma3(c: dict, path: Path) -> dict:
    """ModelConfig fields of a Gemma 3 text config (transformers 4.5x and 5 spellings), refusing
    what the model code does not do."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key):
            raise GearshiftError(f"{key} is not supported (set to {c[key]} in {path})")
    if c.get("use_bidirectional_attention"):
        raise GearshiftError(f"bidirectional attention (use_bidirectional_attention in {path}) is not supported")
    if c.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise GearshiftError(f"unsupported activation {c['hidden_activation']!r} in {path}")
    n = c["num_hidden_layers"]
    every = c.get("sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    types = c.get("layer_types") or [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)
    ]
    local = (c.get("rope_parameters") or {}).get("sliding_attention", {})
    if local.get("rope_type", "default") != "default":
        raise GearshiftError(f"RoPE scaling in the sliding layers ({path}) is not supported")
    return {
        "post_norms": True,
        "act": "gelu_tanh",
        "embed_scale": c["hidden_size"] ** 0.5,
        "attn_scale": c.get("query_pre_attn_scalar", c.get("head_dim", 256)) ** -0.5,
        "sliding_window": c.get("sliding_window"),
        "layer_types": list(types),
        "rope_local_theta": local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)),
    }


def read_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        return read_hf(path)
    return read_gguf(path)


# ---------------------------------------------------------------- building the runtime model


def choose_formats(bits: dict[str, float], device: torch.device, weights: str) -> dict[str, str]:
    """Pick each linear's weight format: never below the precision the file had.

    On a CPU decoding is bound by bytes streamed per token, so 4-bit layers run on the int4
    kernel and 5-8-bit layers on the int8 one; float layers stay float32. A quantized file's LM
    head runs on the int8 kernel: a quarter of float32's bytes (the head is a fifth of SmolLM2's
    weights), and, unlike MKL's float32 GEMM, its rows do not depend on how many are computed
    together, which speculative verification needs to be bit-exact. On CUDA, bf16.
    """
    if weights != "auto":
        if weights in ("int4", "int8") and device.type != "cpu":
            raise GearshiftError(f"weight format {weights} runs on the CPU only; use bfloat16 on {device.type}")
        return {"layers": weights, "lm_head": weights}
    if device.type != "cpu":
        return {"layers": "bfloat16", "lm_head": "bfloat16"}

    def pick(b: float) -> str:
        return "int4" if b <= 4 else "int8" if b <= 8 else "float32"

    layer_bits = max(v for k, v in bits.items() if ".layers." in k and k.endswith("proj.weight"))
    layers = pick(layer_bits)
    return {"layers": layers, "lm_head": "float32" if layers == "float32" else "int8"}


def q8_0_blocks(w: torch.Tensor, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w [rows, cols] as GGUF Q8_0 blocks: int8 codes and a float32 scale per 32 values, if its
    values are exactly such blocks' (a file's Q8_0 table, dequantized), else None. llama.cpp gives
    each block's largest magnitude the code 127 and stores the scale as a float16, so dividing that
    magnitude by 127 gives the scale back exactly; the check is that codes x scales is w, bit for bit."""
    if w.dim() != 2 or w.shape[1] % Q8_0_BLOCK:
        return None
    codes = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], w.shape[1] // Q8_0_BLOCK, dtype=torch.float32)
    for at in range(0, w.shape[0], rows):  # (in chunks: a 262k-row table would need GBs of temporaries)
        b = w[at : at + rows].float().reshape(-1, w.shape[1] // Q8_0_BLOCK, Q8_0_BLOCK)
        d = b.abs().amax(-1) / 127
        q = torch.round(b / d.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
        if q.abs().max() > 127 or not torch.equal(q * d[..., None], b):
            return None
        codes[at : at + rows], scales[at : at + rows] = q.to(torch.int8).reshape(-1, w.shape[1]), d
    return codes, scales


def build_model(ck: Checkpoint, fmts: dict[str, str], dtype: torch.dtype) -> Transformer:
    """The model with the checkpoint's weights in the formats given; a Q8_0 input embedding table
    (`ck.bits` 8) stays in its blocks where its values are exactly theirs (`fmts["embed"]` is then
    set to "q8_0")."""
    cfg, t = ck.config, ck.tensors
    emb = t["model.embed_tokens.weight"]
    blocks = q8_0_blocks(emb) if ck.bits.get("model.embed_tokens.weight", 32) == 8 else None
    if blocks is not None:
        fmts["embed"] = "q8_0"
    with torch.device("meta"):
        model = Transformer(cfg, fmts, dtype)
    model.to_empty(device="cpu")
    model.init_rope()
    if blocks is not None:
        model.embed_q, model.embed_d = blocks
    else:
        model.embed = emb.to(dtype)
    model.norm.weight = t["model.norm.weight"]
    model.lm_head.set_weight(t.get("lm_head.weight", t["model.embed_tokens.weight"]))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
        qkv = [t[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        bias = [t[p + f"self_attn.{n}_proj.bias"] for n in "qkv"] if cfg.qkv_bias else None
        qkv[:2] = [interleave_rope_rows(w, heads[n]) for w, n in zip(qkv, "qk")]
        if bias:
            bias[:2] = [interleave_rope_rows(b, heads[n]) for b, n in zip(bias, "qk")]
        layer.qkv.set_weight(torch.cat(qkv), torch.cat(bias) if bias else None)
        layer.o.set_weight(t[p + "self_attn.o_proj.weight"], t.get(p + "self_attn.o_proj.bias"))
        gate_up_bias = [t[p + f"mlp.{n}_proj.bias"] for n in ("gate", "up")] if cfg.mlp_bias else None
        layer.gate_up.set_weight(
            torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]),
            torch.cat(gate_up_bias) if gate_up_bias else None,
        )
        layer.down.set_weight(t[p + "mlp.down_proj.weight"], t.get(p + "mlp.down_proj.bias"))
        layer.attn_norm.weight = t[p + "input_layernorm.weight"]
        if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention output's norm
            layer.post_attn_norm.weight = t[p + "post_attention_layernorm.weight"]
            layer.mlp_norm.weight = t[p + "pre_feedforward_layernorm.weight"]
            layer.post_mlp_norm.weight = t[p + "post_feedforward_layernorm.weight"]
        else:
            layer.mlp_norm.weight = t[p + "post_attention_layernorm.weight"]
        if cfg.qk_norm:  # per head, so in the rows' interleaved-pair order
            layer.q_norm.weight = interleave_rope_rows(t[p + "self_attn.q_norm.weight"], 1)
            layer.k_norm.weight = interleave_rope_rows(t[p + "self_attn.k_norm.weight"], 1)
    return model


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    path: Path
    quantization: str
    load_seconds: float
    cached: bool


def _cache_key(path: Path, weights: str) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{weights}|{torch.__version__}|{CACHE_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _finish(model: Transformer, device: torch.device) -> Transformer:
    model.init_rope()
    return model.to(device).eval()


def load(
    model: str | Path | None = None, device: str | None = None, weights: str = "auto", use_cache: bool = True
) -> Loaded:
    """Load a GGUF file or Hugging Face directory (None = the default model)."""
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    if weights != "auto" and weights not in FORMATS:
        raise GearshiftError(f"unknown weight format {weights!r}; choose from auto, {', '.join(FORMATS)}")
    path = hub.resolve_model(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GearshiftError("device cuda requested but no CUDA GPU is available")
    cache_dir = hub.home() / "converted" / f"{path.stem}-{_cache_key(path, weights + dev.type)}"
    if use_cache and path.is_file() and (cache_dir / "model.safetensors").exists():
        meta = json.loads((cache_dir / "meta.json").read_text())
        cfg = ModelConfig(**meta["config"])
        with torch.device("meta"):
            m = Transformer(cfg, meta["formats"], getattr(torch, meta["dtype"]))
        m.load_state_dict(load_file(str(cache_dir / "model.safetensors")), assign=True, strict=True)
        return Loaded(
            _finish(m, dev), Tokenizer.from_dir(cache_dir), path, meta["quantization"], time.perf_counter() - t0, True
        )
    ck = read_checkpoint(path)
    fmts = choose_formats(ck.bits, dev, weights)
    dtype = torch.float32 if dev.type == "cpu" or "float32" in fmts.values() else torch.bfloat16
    m = build_model(ck, fmts, dtype)
    tok = Tokenizer.from_dir(ck.tokenizer_dir)
    if path.is_file():
        shutil.rmtree(ck.tokenizer_dir, ignore_errors=True)
        if use_cache:
            tmp = hub.atomic_dir(cache_dir)
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp / "model.safetensors"))
            tok.save(tmp)
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "config": ck.config.to_dict(),
                        "formats": fmts,
                        "dtype": str(dtype).replace("torch.", ""),
                        "quantization": ck.quantization,
                    }
                )
            )
            hub.commit_dir(tmp, cache_dir)
    return Loaded(_finish(m, dev), tok, path, ck.quantization, time.perf_counter() - t0, False)


def load_exit_head(path: Path, target_path: Path, model: Transformer) -> tuple[int, ExitHead]:
    """(layers, head) of an exit trained by `gearshift distill --early-exit` for the model at `target_path`."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "config.json").read_text())["gearshift_exit"]
        state = load_file(str(path / "exit.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise GearshiftError(f"{path} is not an early-exit head from gearshift distill --early-exit: {e}") from None
    if Path(meta["base"]).resolve() != Path(target_path).resolve():
        raise GearshiftError(f"{path} was trained for {meta['base']}, not {target_path}")
    head = ExitHead(model.cfg.dim, model.cfg.norm_eps, meta["rank"])
    head.load_state_dict(state)
    return meta["layers"], head.to(model.device).eval().requires_grad_(False)
