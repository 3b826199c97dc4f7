"""A long stream under the `streaming` KV policy (budget 256) in a 1,024-position slot, past the
model's trained positions: entries held, RSS, the RoPE positions used, and per 2,000-token stretch
how repetitive the text is (distinct 4-grams / all) and how likely the model found its own samples.

    python -m gearshift.tools.stream_long [TOKENS] [OUT.json]
"""

from __future__ import annotations

import json
import resource
import sys
import time

from ..kv_policy import KVPolicy


def main(argv: list[str]) -> dict:
    from ..llm import load

    n = int(argv[1]) if len(argv) > 1 else 20000
    llm = load(max_model_len=1024, max_num_seqs=1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stream = llm.stream(
        [{"role": "user", "content": "Tell me a long story about a sailor who travels the world."}],
        kv_policy=KVPolicy("streaming", budget=256),
        max_tokens=n,
        ignore_eos=True,
        temperature=0.8,
        seed=1,
        logprobs=0,
    )
    most, t0 = 0, time.perf_counter()
    for _ in stream:
        most = max(most, llm.core.cache.lengths[0])
    ids = stream.completion.token_ids
    rows = []
    for a in range(0, len(ids), 2000):
        w = ids[a : a + 2000]
        grams = [tuple(w[i : i + 4]) for i in range(len(w) - 3)]
        lp = [x.logprob for x in stream.completion.logprobs[a : a + 2000]]
        rows.append(
            {
                "tokens": f"{a}-{a + len(w)}",
                "distinct_4grams": round(len(set(grams)) / max(1, len(grams)), 3),
                "mean_logprob": round(sum(lp) / len(lp), 3),
            }
        )
    out = {
        "generated": len(ids),
        "slot_positions": 1024,
        "budget": 256,
        "most_entries": most,
        "rope_position_last": llm.core.cache.lengths[0],
        "rss_mib_before": round(rss0),
        "rss_mib_peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": round(time.perf_counter() - t0),
        "windows": rows,
        "text_start": llm.tokenizer.decode(ids[:60]),
        "text_end": llm.tokenizer.decode(ids[-60:]),
    }
    print(json.dumps(out, indent=1))
    with open(argv[2] if len(argv) > 2 else "results/stream_long.json", "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv)
