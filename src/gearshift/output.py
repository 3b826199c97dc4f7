"""Output processing: new tokens through the stop rules and the detokenizer, with logprobs.

The engine core hands every token a strategy produced to `Outputs.advance`, which appends it to
the sequence unless a stop rule ends it first (EOS, a stop string, the length limit), turns the
kept tokens into text (held back while it may be the start of a stop string, so a stream never
shows text it later takes back), and, when asked, their log-probabilities.
"""

from __future__ import annotations

import time

import torch

from .sequence import Logprob, Sequence, Status, StepOutput
from .tokenizer import IncrementalDetokenizer, Tokenizer


class TextState:
    """Per-sequence detokenization and stop-string handling.

    Text that might be the start of a stop string is held back, so a stream never shows a
    stop string it later has to take back.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.detok = IncrementalDetokenizer(tok, prompt_ids)
        self.stop = stop
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.detok.push([token])
        safe = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
                safe = at
                break
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):  # a stop string may be starting
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        if not self.stopped:
            self.text += self.detok.flush()
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


class Outputs:
    def __init__(self, tokenizer: Tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def start(self, seq: Sequence) -> None:
        seq.text = TextState(self.tokenizer, seq.request.prompt, seq.params.stop)

    def advance(self, seq: Sequence, tokens: list[int], logits: torch.Tensor, rows: list[int]) -> StepOutput:
        """Append new tokens through the stop rules (token i was chosen from `logits[rows[i]]`); sets
        the sequence's finish reason when one ends it."""
        stats, params = seq.stats, seq.params
        stats.work.produced += len(tokens)
        kept, text = [], ""
        for t in tokens:
            stats.work.consumed += 1
            if t in self.eos_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
                break
            seq.tokens.append(t)
            kept.append(t)
            text += seq.text.push(t)
            if seq.text.stopped:
                seq.finish_reason = "stop"
            elif seq.remaining <= 0:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        stats.generated = len(seq.tokens) - seq.prompt_len
        if stats.timing.first_token is None:
            stats.timing.first_token = time.perf_counter()
            stats.timing.first_step_tokens = len(kept)
            seq.status = Status.DECODING
        out = StepOutput(seq.id, kept, text)
        if seq.logprobs is not None and kept:
            out.logprobs = self.logprobs(logits[rows[: len(kept)]], kept, params.logprobs)
            seq.logprobs += out.logprobs
        return out

    def flush(self, seq: Sequence) -> str:
        """The text held back at the end (a stop string's possible start that never completed)."""
        return seq.text.flush()

    def logprobs(self, logits: torch.Tensor, tokens: list[int], top: int) -> list[Logprob]:
        """The target's (or, for lossy EAD's small turns, the small model's) log-probabilities of the
        chosen tokens and the `top` likeliest ones, from the raw logits (temperature 1, no top-k/p)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        tops = logp.topk(min(top, logp.shape[-1]), dim=-1) if top else None
        out = []
        for i, (t, lp) in enumerate(zip(tokens, chosen)):
            alts = (
                []
                if tops is None
                else [self._entry(a, v) for a, v in zip(tops.indices[i].tolist(), tops.values[i].tolist())]
            )
            out.append(self._entry(t, lp, alts))
        return out

    def _entry(self, token: int, logprob: float, top: list[Logprob] | None = None) -> Logprob:
        raw = self.tokenizer.token_bytes(token)
        return Logprob(token, raw.decode("utf-8", errors="replace"), logprob, list(raw), top or [])
