"""The Python API: `LLM.generate` and `LLM.stream`, thin loops over the engine core.

An `LLM` owns one `EngineCore` for its whole life, so its KV cache slots and prefix cache carry
over between calls: the next turn of a chat, or another question about the same document, reads
only what is new.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from .core import EngineCore
from .drafters import Drafter, ModelDrafter
from .ead import EAD
from .errors import GearshiftError
from .kv_policy import KVPolicy, duo_path
from .loading import Loaded, load as load_weights
from .model import Transformer
from .sampling import SamplingParams
from .scheduler import EngineConfig
from .sequence import Completion, Request
from .strategies import make_drafter, strategy_factory
from .tokenizer import Tokenizer, encode_prompt

Prompt = str | list[dict] | list[int]


class Stream:
    """Text deltas of one completion as it is generated; `completion` is set once it ends.
    Leaving the loop early aborts the sequence and frees its slot."""

    def __init__(self, core: EngineCore, request: Request):
        core.check(request)
        self.core, self.request = core, request
        self.seq_id: int | None = None
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        if self.seq_id is not None:
            raise RuntimeError("a stream can be iterated once")
        self.seq_id = self.core.add(self.request)  # added when read, so an unread stream holds no slot
        try:
            while self.completion is None:
                for out in self.core.step():
                    if out.seq_id != self.seq_id:
                        continue
                    if out.text:
                        yield out.text
                    self.completion = out.completion
        finally:
            if self.completion is None:
                self.core.abort(self.seq_id)


class LLM:
    """A loaded model with its tokenizer and engine core: `generate` returns completions, `stream` yields text.

    Engine options (`EngineConfig`): max_num_seqs, max_batched_tokens, max_model_len, prefix_cache,
    prefix_cache_bytes."""

    def __init__(self, loaded: Loaded, **engine: object):
        self.loaded = loaded
        self.model: Transformer = loaded.model
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.eos_ids = set(self.model.cfg.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            self.eos_ids.add(self.tokenizer.eos_id)
        self.core = EngineCore(self.model, self.tokenizer, self.eos_ids, EngineConfig(**engine))
        self._drafters: dict[str, Drafter] = {}

    @property
    def device(self):
        return self.model.device

    def encode(self, prompt: Prompt) -> list[int]:
        """Chat messages go through the chat template; a string is tokenized as is; ids pass through."""
        return encode_prompt(self.tokenizer, self.model.cfg.vocab_size, prompt)

    def drafter(self, spec: str | Drafter | None, k: int | None = None) -> Drafter | None:
        """A drafter by name ("lookup", "early-exit:L", "model:PATH", "auto", ...), built once and
        reused (each sequence drafts with its own fork of it); `k` caps its draft length (or tree size)."""
        if spec is None or not isinstance(spec, str):
            return spec
        if spec not in self._drafters:
            self._drafters[spec] = make_drafter(spec, self.model, self.tokenizer, Path(self.loaded.path))
        if k is None:
            return self._drafters[spec]
        key = f"{spec}#k={k}"
        if key not in self._drafters:
            base = self._drafters[spec]
            capped = base.fork()
            capped.length = replace(base.length, k=min(base.length.k, k), k_min=min(base.length.k_min, k), k_max=k)
            self._drafters[key] = capped
        return self._drafters[key]

    def requests(self, prompt: Prompt, drafter: str | Drafter | None = None, ead: EAD | None = None, n: int = 1,
                 kv_policy: str | KVPolicy | None = None, kv_budget: int | None = None, **params) -> list[Request]:
        """The requests for one prompt: `n` samples, the j-th seeded with seed + j when a seed is given."""
        p = SamplingParams(**params)
        if not isinstance(n, int) or n < 1:
            raise GearshiftError(f"n must be a positive integer, got {n!r}")
        kv = kv_policy if isinstance(kv_policy, KVPolicy) else KVPolicy.of(kv_policy, kv_budget)
        if kv is not None and kv.name == "duo" and kv.heads is None:  # this model's calibrated head file
            heads = duo_path(self.loaded.path)
            if not heads.exists():
                raise GearshiftError(f"kv_policy duo needs this model's retrieval heads: run `gearshift "
                                     f"calibrate-duo` first (writes {heads})")
            kv = replace(kv, heads=str(heads))
        make = self.strategy(drafter, ead)
        ids = self.encode(prompt)
        return [Request(ids, p if p.seed is None or j == 0 else SamplingParams(**{**vars(p), "seed": p.seed + j}), make,
                        kv=kv) for j in range(n)]

    def strategy(self, drafter: str | Drafter | None, ead: EAD | None):
        """The per-sequence strategy factory a request carries: plain, speculative or entropy-adaptive."""
        if ead is None:
            return strategy_factory(self.model, self.drafter(drafter))
        if drafter is not None:
            raise GearshiftError("use a drafter or entropy-adaptive decoding, not both")
        small = self.drafter(ead.small)
        if not isinstance(small, ModelDrafter):
            raise GearshiftError(f"ead needs a small model (early-exit[:L] or model:PATH), not {ead.small!r}")
        return strategy_factory(self.model, ead=(small, ead))

    def generate(self, prompt: Prompt | list[Prompt], drafter: str | Drafter | None = None, ead: EAD | None = None,
                 n: int = 1, kv_policy: str | KVPolicy | None = None, kv_budget: int | None = None,
                 **params) -> Completion | list[Completion]:
        """Complete one prompt, or several (a list of prompts), all decoded side by side.

        With a drafter, decoding is speculative and lossless: greedy output is token-identical
        to plain decoding, sampled output has the target's distribution. With `ead`, a small model
        writes where it is sure (see `ead.py`): lossy, unless `ead.verify`. `n` > 1 returns n
        completions per prompt. Every output is the one the prompt gets alone. `kv_policy`
        (streaming, snapkv, h2o, pyramid; `kv_policy.py`) and `kv_budget` (entries kept per layer
        and KV head) bound the sequence's KV cache.
        """
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        requests = [r for x in (prompt if many else [prompt])
                    for r in self.requests(x, drafter, ead, n, kv_policy, kv_budget, **params)]
        ids = [self.core.add(r) for r in requests]
        done: dict[int, Completion] = {}
        try:
            while len(done) < len(ids):
                for out in self.core.step():
                    if out.completion is not None:
                        done[out.seq_id] = out.completion
        finally:
            for i in ids:
                if i not in done:
                    self.core.abort(i)
        results = [done[i] for i in ids]
        return results if many or n > 1 else results[0]

    def stream(self, prompt: Prompt, drafter: str | Drafter | None = None, ead: EAD | None = None,
               kv_policy: str | KVPolicy | None = None, kv_budget: int | None = None, **params) -> Stream:
        """Text deltas as they are generated; the finished Completion is then in `.completion`."""
        request, = self.requests(prompt, drafter, ead, 1, kv_policy, kv_budget, **params)
        return Stream(self.core, request)


def load(model: str | Path | None = None, device: str | None = None, weights: str = "auto", **engine) -> LLM:
    """Load a model (None = the default SmolLM2-135M-Instruct, pulled on first use)."""
    return LLM(load_weights(model, device=device, weights=weights), **engine)
