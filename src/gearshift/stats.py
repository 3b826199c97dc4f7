"""Per-sequence numbers: one small dataclass per concern, added up where the work happens.

A finished sequence's `Completion.stats` carries them typed (the server, the CLI and the benches
read fields, not string keys); `SequenceStats.as_dict` flattens them once for JSON and people
(`Completion.metrics`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Timing:
    """Wall-clock moments (time.perf_counter) in a sequence's life."""

    arrival: float
    admitted: float | None = None  # given a cache slot
    first_token: float | None = None
    finished: float | None = None
    first_step_tokens: int = 0  # tokens that arrived with the first one (speculation can bring several)

    @property
    def queue_s(self) -> float:
        return _span(self.arrival, self.admitted)

    @property
    def ttft_s(self) -> float:
        return _span(self.arrival, self.first_token)

    @property
    def prefill_s(self) -> float:
        """Admission to the first token: the prompt read in, and the first step."""
        return _span(self.admitted, self.first_token)

    @property
    def decode_s(self) -> float:
        return _span(self.first_token, self.finished)


def _span(a: float | None, b: float | None) -> float:
    return b - a if a is not None and b is not None else 0.0


@dataclass
class Work:
    """What the target model did for the sequence."""

    target_forwards: int = 0  # steps whose logits gave tokens: MAT's denominator (a prefill chunk is none)
    target_rows: int = 0  # tokens the target read, the prompt included
    produced: int = 0  # tokens the strategy produced, before a stop cut them
    consumed: int = 0  # tokens taken from the model, the stopping EOS included

    @property
    def mat(self) -> float:
        """Mean tokens per target forward (1.0 for plain decoding, as in Spec-Bench)."""
        return self.consumed / self.target_forwards if self.target_forwards else 0.0


@dataclass
class Speculation:
    drafts: int = 0  # steps that scored a draft (vLLM's spec_decode_num_drafts)
    proposed: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0  # the steps' forward and verification (shared with the rest of the batch)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class EADCost:
    """Entropy-adaptive decoding: who wrote the tokens, and the compute both models spent (every
    token each one read) against the large model alone reading the prompt and the output."""

    large_tokens: int = 0
    small_tokens: int = 0
    flops: float = 0.0
    large_only_flops: float = 0.0

    @property
    def large_fraction(self) -> float:
        made = self.large_tokens + self.small_tokens
        return self.large_tokens / made if made else 0.0

    @property
    def relative_compute(self) -> float:
        return self.flops / self.large_only_flops if self.large_only_flops else 0.0


@dataclass
class SequenceStats:
    timing: Timing
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    generated: int = 0
    work: Work = field(default_factory=Work)
    kv_entries: int = 0  # cache entries (every layer and KV head) the sequence held at its end
    kv_bytes: int = 0  # what those entries take (keys and values)
    kv_full_bytes: int = 0  # what a full cache would take for the same tokens
    spec: Speculation | None = None  # speculative strategies only
    ead: EADCost | None = None  # entropy-adaptive strategies only

    @property
    def tok_per_s(self) -> float:
        """Decode speed: tokens after the first step's, over the time after the first token."""
        decode_tokens, decode_s = self.generated - self.timing.first_step_tokens, self.timing.decode_s
        return decode_tokens / decode_s if decode_s > 0 and decode_tokens > 0 else 0.0

    def as_dict(self) -> dict:
        """Everything as one flat dict, for JSON and people (`Completion.metrics`)."""
        t, w = self.timing, self.work
        m = {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated,
            "queue_s": t.queue_s,
            "ttft_s": t.ttft_s,
            "prefill_s": t.prefill_s,
            "decode_s": t.decode_s,
            "tok_per_s": self.tok_per_s,
            "target_forwards": w.target_forwards,
            "target_rows": w.target_rows,
            "mat": w.mat,
            "kv_entries": self.kv_entries,
            "kv_bytes": self.kv_bytes,
            "kv_full_bytes": self.kv_full_bytes,
        }
        if self.spec is not None:  # its fields, and what they give
            m.update(asdict(self.spec), acceptance_rate=self.spec.acceptance_rate)
        if self.ead is not None:
            e = self.ead
            m.update(asdict(e), large_fraction=e.large_fraction, relative_compute=e.relative_compute)
        return m
