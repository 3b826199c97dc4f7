"""The Python API: `LLM.generate` and `LLM.stream`, thin loops over the engine core.

An `LLM` owns one `EngineCore` for its whole life, so its KV cache slots and prefix cache carry
over between calls: the next turn of a chat, or another question about the same document, reads
only what is new. Every step advances every sequence, so an output router (keyed by sequence id)
hands each caller only its own outputs: streams may be interleaved with each other and with
`generate`, and a stream left early is aborted without its last output reaching anyone else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

from .config import EngineConfig
from .core import EngineCore
from .drafters import Drafter, ModelDrafter
from .ead import EAD
from .errors import GearshiftError
from .kv_policy import KVPolicy
from .loading import Loaded
from .loading import load as load_weights
from .model import Transformer
from .sampling import SamplingParams
from .sequence import Completion, Request, StepOutput
from .strategies import make_drafter, strategy_factory
from .tokenizer import Tokenizer, encode_prompt

Prompt = str | list[dict] | list[int]


class Stream:
    """Text deltas of one completion as it is generated; `completion` is set once it ends.
    Leaving the loop early aborts the sequence and frees its slot."""

    def __init__(self, llm: "LLM", request: Request):
        llm.core.check(request)
        self.llm, self.request = llm, request
        self.seq_id: int | None = None
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        if self.seq_id is not None:
            raise RuntimeError("a stream can be iterated once")
        self.seq_id = self.llm._add(self.request)  # added when read, so an unread stream holds no slot
        try:
            while self.completion is None:
                out = self.llm._next(self.seq_id)
                if out.text:
                    yield out.text
                self.completion = out.completion
            _raise_failed([self.completion])
        finally:
            self.llm._release(self.seq_id)


def _raise_failed(completions: list[Completion]) -> None:
    failed = next((c for c in completions if c.finish_reason == "error"), None)
    if failed is not None:
        raise GearshiftError(f"generation failed: {failed.error}")


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
        self._outbox: dict[int, deque[StepOutput]] = {}  # per sequence a caller waits on: its outputs

    # ------------------------------------------------------------------ the output router

    def _add(self, request: Request) -> int:
        seq_id = self.core.add(request)
        self._outbox[seq_id] = deque()
        return seq_id

    def _next(self, seq_id: int) -> StepOutput:
        """The sequence's next output, stepping the core as needed. Every step moves every sequence:
        outputs of the others (another `generate`'s, an interleaved stream's) wait in their own
        boxes; those of sequences nobody waits on any more (an aborted stream's) are dropped."""
        box = self._outbox[seq_id]
        while not box:
            if not self.core.has_work():
                raise RuntimeError(f"sequence {seq_id} is not in the engine")
            for out in self.core.step():
                if (mine := self._outbox.get(out.seq_id)) is not None:
                    mine.append(out)
        return box.popleft()

    def _release(self, seq_id: int) -> None:
        """The caller stops listening: end the sequence if it is still running."""
        self._outbox.pop(seq_id, None)
        if seq_id in self.core.seqs:
            self.core.abort(seq_id)

    @property
    def device(self):
        return self.model.device

    def encode(self, prompt: Prompt) -> list[int]:
        """Chat messages go through the chat template; a string is tokenized as is; ids pass through."""
        return encode_prompt(self.tokenizer, self.model.cfg.vocab_size, prompt)

    def drafter(self, spec: str | Drafter | None) -> Drafter | None:
        """A drafter by name ("lookup", "early-exit:L", "model:PATH", "auto", ...), built once and
        reused (each sequence drafts with its own fork of it)."""
        if spec is None or not isinstance(spec, str):
            return spec
        if spec not in self._drafters:
            self._drafters[spec] = make_drafter(spec, self.model, self.tokenizer, Path(self.loaded.path))
        return self._drafters[spec]

    def requests(
        self,
        prompt: Prompt,
        drafter: str | Drafter | None = None,
        ead: EAD | None = None,
        n: int = 1,
        kv_policy: str | KVPolicy | None = None,
        kv_budget: int | None = None,
        make=None,
        **params,
    ) -> list[Request]:
        """The requests for one prompt: `n` samples, the j-th seeded with seed + j when a seed is given.
        `make` is a strategy factory made earlier (`strategy`), instead of `drafter` and `ead`."""
        p = SamplingParams(**params)
        if not isinstance(n, int) or n < 1:
            raise GearshiftError(f"n must be a positive integer, got {n!r}")
        kv = kv_policy if isinstance(kv_policy, KVPolicy) else KVPolicy.of(kv_policy, kv_budget)
        if kv is not None:
            kv = kv.for_model(self.loaded.path)
        make = make or self.strategy(drafter, ead)
        ids = self.encode(prompt)
        requests = [
            Request(
                ids, p if p.seed is None or j == 0 else SamplingParams(**{**vars(p), "seed": p.seed + j}), make, kv=kv
            )
            for j in range(n)
        ]
        self.core.check(requests[0])  # what the engine would refuse, refused here (the server's 400), not later
        return requests

    def strategy(self, drafter: str | Drafter | None, ead: EAD | None, k: int | None = None):
        """The per-sequence strategy factory a request carries: plain, speculative or entropy-adaptive;
        `k` caps the drafter's draft length (or tree size) for this request's sequences."""
        if ead is None:
            return strategy_factory(self.model, self.drafter(drafter), k=k)
        if drafter is not None:
            raise GearshiftError("use a drafter or entropy-adaptive decoding, not both")
        small = self.drafter(ead.small)
        if not isinstance(small, ModelDrafter):
            raise GearshiftError(f"ead needs a small model (early-exit[:L] or model:PATH), not {ead.small!r}")
        return strategy_factory(self.model, ead=(small, ead))

    def generate(
        self,
        prompt: Prompt | list[Prompt],
        drafter: str | Drafter | None = None,
        ead: EAD | None = None,
        n: int = 1,
        kv_policy: str | KVPolicy | None = None,
        kv_budget: int | None = None,
        **params,
    ) -> Completion | list[Completion]:
        """Complete one prompt, or several (a list of prompts), all decoded side by side.

        With a drafter, decoding is speculative and lossless: greedy output is token-identical
        to plain decoding, sampled output has the target's distribution. With `ead`, a small model
        writes where it is sure (see `ead.py`): lossy, unless `ead.verify`. `n` > 1 returns n
        completions per prompt. Every output is the one the prompt gets alone. `kv_policy`
        (streaming, snapkv, h2o, pyramid; `kv_policy.py`) and `kv_budget` (entries kept per layer
        and KV head) bound the sequence's KV cache. If a sequence fails (its drafter raises, say),
        GearshiftError names why, the call's other sequences are ended, and nothing else is touched:
        streams interleaved with this call go on (each caller gets only its own outputs).
        """
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        requests = [
            r
            for x in (prompt if many else [prompt])
            for r in self.requests(x, drafter, ead, n, kv_policy, kv_budget, **params)
        ]
        ids = []
        try:
            for r in requests:
                ids.append(self._add(r))
            results = []
            for i in ids:
                out = self._next(i)
                while out.completion is None:
                    out = self._next(i)
                results.append(out.completion)
                _raise_failed(results[-1:])  # (a finally below ends the others)
        finally:
            for i in ids:
                self._release(i)
        return results if many or n > 1 else results[0]

    def stream(
        self,
        prompt: Prompt,
        drafter: str | Drafter | None = None,
        ead: EAD | None = None,
        kv_policy: str | KVPolicy | None = None,
        kv_budget: int | None = None,
        **params,
    ) -> Stream:
        """Text deltas as they are generated; the finished Completion is then in `.completion`."""
        (request,) = self.requests(prompt, drafter, ead, 1, kv_policy, kv_budget, **params)
        return Stream(self, request)


def load(model: str | Path | None = None, device: str | None = None, weights: str = "auto", **engine) -> LLM:
    """Load a model (None = the default SmolLM2-135M-Instruct, pulled on first use)."""
    return LLM(load_weights(model, device=device, weights=weights), **engine)
