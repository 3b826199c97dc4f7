"""Tiny random Llamas saved as real Hugging Face directories, for tests that need many runs."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

VOCAB = 8

# transformers config arguments of the tiny random models the architecture tests build with
# transformers' own classes (test_correctness, test_architectures)
TINY_DIMS = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256
)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    """Overwrite every parameter: large random weights (peaked predictions, where transformers'
    init gives near-uniform ones), norms away from 1, nonzero biases (a weight loaded into the
    wrong place shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(std * noise)


def tiny_model_dir(path: Path, layers: int, seed: int, vocab: int = VOCAB, head_scale: float = 0.04) -> Path:
    """A random Llama saved as a Hugging Face directory with a word-level tokenizer; a larger
    `head_scale` makes its predictions more peaked (lower, more varied entropies)."""
    g = torch.Generator().manual_seed(seed)
    dim, hidden, heads, kv, hd = 64, 128, 4, 2, 16
    t = {
        "model.embed_tokens.weight": torch.randn(vocab, dim, generator=g),
        "model.norm.weight": torch.ones(dim),
        "lm_head.weight": torch.randn(vocab, dim, generator=g) * head_scale,
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (heads * hd, dim)),
            ("self_attn.k_proj", (kv * hd, dim)),
            ("self_attn.v_proj", (kv * hd, dim)),
            ("self_attn.o_proj", (dim, heads * hd)),
            ("mlp.gate_proj", (hidden, dim)),
            ("mlp.up_proj", (hidden, dim)),
            ("mlp.down_proj", (dim, hidden)),
        ]:
            t[p + name + ".weight"] = torch.randn(shape, generator=g) * 0.2
        t[p + "input_layernorm.weight"] = torch.ones(dim)
        t[p + "post_attention_layernorm.weight"] = torch.ones(dim)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": dim,
                "intermediate_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            }
        )
    )
    tok = HFTokenizer(models.WordLevel({chr(97 + i): i for i in range(vocab)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path
