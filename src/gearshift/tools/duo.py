"""`gearshift calibrate-duo`: which KV heads retrieve, for the `duo` KV policy (DuoAttention).

DuoAttention keeps the full cache only for *retrieval heads* and sinks + a recent window for the
others, and finds the retrieval heads once per model on synthetic passkey data. It learns a gate
per head by distillation; this command measures what those gates stand for, directly, as
RazorAttention and the retrieval-head studies do: on generated passkey prompts (a number hidden
at a random depth in ordinary text, then asked for), how much attention each KV head pays to the
hidden number while the model writes the answer (teacher-forced: one forward per sample, the
answer's queries against every key). A head that looks there is a retrieval head; one that only
looks at the first tokens and its neighbours loses nothing under sinks + window.

The result is a JSON file of per-head scores ([layers][KV heads], the attention mass on the
needle averaged over samples); the `duo` policy keeps the `retrieval` fraction of highest-scoring
heads whole (`kv_policy.retrieval_heads`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from ..attention import Batch, Segment
from ..errors import GearshiftError
from ..kv_policy import attention_scores, duo_path


def _sample(tokenizer, parts: list[str], length: int, rng: random.Random) -> tuple[list[int], range, int]:
    """A raw passkey prompt with its answer appended: (ids, the needle's positions, where the answer starts)."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    key = rng.randint(10000, 99999)
    needle = enc(f" The pass key is {key}. Remember it. ")
    question = enc("\nWhat is the pass key? The pass key is")
    answer = enc(f" {key}.")
    filler: list[int] = []
    while len(filler) < length - len(needle) - len(question) - len(answer):
        filler += enc(" " + rng.choice(parts))
    filler = filler[: length - len(needle) - len(question) - len(answer)]
    at = int(len(filler) * (0.1 + 0.8 * rng.random()))
    ids = filler[:at] + needle + filler[at:] + question + answer
    return ids, range(at, at + len(needle)), len(ids) - len(answer)


@torch.inference_mode()
def head_scores(llm, samples: int = 8, length: int = 1500, seed: int = 0, chunk: int = 512) -> torch.Tensor:
    """[layers, KV heads]: mean attention mass the answer's queries put on the needle."""
    from tqdm import tqdm

    from .bench_kv import _haystack

    model = llm.model
    if length + 8 > llm.core.window:
        raise GearshiftError(f"--length {length} does not fit the model's {llm.core.window}-token window")
    if samples < 1 or length < 64:
        raise GearshiftError("--samples must be >= 1 and --length >= 64")
    rng = random.Random(seed)
    parts = _haystack(rng)
    cache = model.new_cache(1, length + 8)
    total = torch.zeros(model.cfg.n_layers, model.cfg.n_kv_heads, dtype=torch.float64)
    for _ in tqdm(range(samples), desc="calibrate duo", unit="sample", file=sys.stderr):
        ids, needle, answer = _sample(llm.tokenizer, parts, length, rng)
        cache.reset(0)
        first = answer - 1  # the row that predicts the answer's first token
        queries: list[torch.Tensor] = []
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            capture = max(0, first - start) if start + len(part) > first else None
            batch = Batch([Segment(0, part, logits_from=None, capture_from=capture)], cache)
            model(batch, cache)
            batch.advance(cache)
            if capture is not None:  # (the answer's rows may straddle two chunks)
                queries = (
                    [torch.cat(x) for x in zip(queries, batch.queries)] if start + capture > first else batch.queries
                )
        n = cache.lengths[0]
        live = torch.ones(model.cfg.n_kv_heads, n, dtype=torch.bool, device=model.device)
        for layer, q in enumerate(queries):
            rows = q[: len(ids) - 1 - first]  # the rows that predict the answer's tokens
            s = attention_scores(rows, cache.k[layer, 0, :n], live, first).cpu().double()  # [KVH, n]
            total[layer] += s[:, needle.start : needle.stop].sum(1) / s.sum(1)
    return total / samples


def calibrate(
    llm, out: str | None = None, samples: int = 8, length: int = 1500, seed: int = 0, plot: str | None = None
) -> dict:
    scores = head_scores(llm, samples, length, seed)
    path = Path(out) if out else duo_path(llm.loaded.path)
    result = {
        "model": str(llm.loaded.path),
        "method": "attention mass on a passkey needle while answering",
        "samples": samples,
        "length": length,
        "seed": seed,
        "scores": scores.tolist(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 7))
        im = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title("attention on the needle")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    result["path"] = str(path)
    return result
