"""`make gpu-check`, second half: the forward-cost curve on the default model's shapes on a GPU.

No model file is needed (GPU machines here have no network): SmolLM2-135M's architecture with
random bf16 weights, measured by the same routine the tree drafters size their trees with
(`hardware.measure`). Prints JSON: milliseconds per forward of k tokens, and each over k = 1.
"""

from __future__ import annotations

import json
import sys

import torch

from .. import hardware
from ..model import ModelConfig, Transformer

SMOLLM2_135M = ModelConfig(
    arch="llama",
    vocab_size=49152,
    dim=576,
    hidden_dim=1536,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    norm_eps=1e-5,
    rope_theta=100000.0,
    max_seq_len=8192,
    tie_embeddings=True,
)


def random_model(cfg: ModelConfig, device: str, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, "bfloat16" if dtype == torch.bfloat16 else "float32", dtype)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for name, buf in model.named_buffers():
        if buf is None or not buf.is_floating_point():
            continue
        if name.endswith("norm.weight"):
            buf.fill_(1.0)
        else:
            buf.normal_(0.0, 0.02, generator=g)
    model.init_rope()
    return model.eval()


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device", file=sys.stderr)
        return 1
    model = random_model(SMOLLM2_135M, "cuda")
    costs = hardware.measure(model, sizes=(1, 2, 4, 8, 16, 32, 64))
    one = costs.seconds[0]
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "model": "SmolLM2-135M shapes, random bf16",
                "forward_ms": {str(n): round(1000 * s, 3) for n, s in zip(costs.sizes, costs.seconds)},
                "over_k1": {str(n): round(s / one, 3) for n, s in zip(costs.sizes, costs.seconds)},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
