"""The engine core: many sequences, one step loop.

`add` turns a request into a sequence, `step` advances every running sequence by one step and
returns what each produced, `abort` ends one at once (its slot is free for the next), and
`has_work` says whether anything is left. A step, whatever strategies the sequences use:

1. admit waiting sequences into free KV cache slots, each starting from the longest prefix of
   its prompt already computed (`prefix_cache.py`);
2. plan: every running sequence gets rows under the step's token budget (`scheduler.py`): the
   tokens it has not read yet (a prompt chunk, a catch-up, the last token), and, once caught up,
   the draft its strategy proposes (`strategies.py`);
3. one target forward over all of those rows (`model.Transformer.forward`: linear layers once for
   the whole batch, attention per row within each sequence's slot);
4. each caught-up sequence's strategy verifies its rows and keeps what it accepts (the cache keeps
   the accepted path, `KVCache.keep`); sequences that decode without the target (lossy EAD's small
   turns) do so;
5. new tokens go through stop rules and the detokenizer; finished sequences free their slot.

A sequence's own work (starting its strategy, drafting, verifying, sampling, its KV policy,
detokenizing) runs isolated: if it raises, that sequence alone ends, with finish reason "error"
and the reason in `Completion.error`, its slot emptied; the step goes on for every other one. Only
a failure of the shared forward fails the whole step.

Speculative sequences share the step with plain ones: a plain sequence brings one row, a
speculative one its last token and its draft (a chain, or a tree whose nodes attend their own
ancestors), and each is verified on its own slice of the batch's logits.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from . import kv_policy
from .attention import Batch
from .errors import GearshiftError
from .model import Transformer
from .prefix_cache import PrefixCache
from .scheduler import EngineConfig, Scheduler, Task
from .sequence import Logprob, Request, Sequence, StepOutput
from .tokenizer import Tokenizer

log = logging.getLogger("gearshift.core")
FAILED = object()  # what `_isolated` returns when the sequence's own work raised


class EngineCore:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_ids: set[int],
                 config: EngineConfig | None = None):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.config = config or EngineConfig()
        self.window = min(model.cfg.max_seq_len, self.config.max_model_len or model.cfg.max_seq_len)
        self.cache = model.new_cache(self.config.max_num_seqs, self.window)
        self.prefix = PrefixCache(self.cache, self.config.prefix_cache_bytes, self.config.prefix_cache)
        self.scheduler = Scheduler(self.config, self.prefix, self.window, model.cfg.vocab_size)
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._ended: list[StepOutput] = []  # aborted sequences, reported by the next step

    # ------------------------------------------------------------------ the interface

    def check(self, request: Request) -> None:
        """Refuse a request the engine cannot run, with a one-line reason."""
        n = len(request.prompt)
        if n == 0:
            raise GearshiftError("the prompt is empty")
        if n >= self.window:
            raise GearshiftError(f"prompt is {n} tokens but the context window is {self.window}")

    def add(self, request: Request) -> int:
        """Queue a request; returns its sequence id. It starts at a step boundary, when a slot is free."""
        self.check(request)
        seq = Sequence(next(self._ids), request, self.tokenizer, self.window, self.model.device)
        self.seqs[seq.id] = seq
        self.scheduler.waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> None:
        """End a sequence now (finish reason "abort"); its slot is free for the next step."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return
        seq.finish_reason = "abort"
        out = StepOutput(seq.id, [], "")
        self._finish(seq, out)
        self._ended.append(out)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._ended)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def kv_held(self) -> tuple[int, int]:
        """Entries (every layer and KV head) and bytes the running sequences' caches hold."""
        slots = [seq.slot for seq in list(self.scheduler.running) if seq.slot is not None]
        return sum(map(self.cache.held, slots)), sum(map(self.cache.held_bytes, slots))

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running sequence by one step; the outputs of the sequences that moved."""
        outputs, self._ended = self._ended, []
        now = time.perf_counter()
        for seq in self.scheduler.admit():
            seq.stats.timing.admitted = now
            self._isolated(seq, outputs, self._start, seq)
        tasks, alone, failed = self.scheduler.plan()
        for seq, error in failed:  # its strategy could not propose
            outputs.append(self._fail(seq, error))
        if tasks:
            batch = Batch([t.segment for t in tasks], self.cache, exact=self.config.exact)
            t0 = time.perf_counter()
            logits = self.model(batch, self.cache)
            forward_s = time.perf_counter() - t0
            captured = self._captured(batch)
            for i, (task, rows) in enumerate(zip(tasks, batch.out_slices)):
                out = self._isolated(task.seq, outputs, self._after_forward, task, logits[rows], forward_s,
                                     captured.get(i))
                if out is not None and out is not FAILED:
                    outputs.append(out)
        for seq in alone:
            out = self._isolated(seq, outputs, self._decide, seq)
            if out is not FAILED:
                outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ one sequence's own work, isolated

    def _isolated(self, seq: Sequence, outputs: list[StepOutput], work: Callable, *args):
        """`work(*args)`, or, if it raises, the sequence's end with finish reason "error" (FAILED)."""
        try:
            return work(*args)
        except Exception as e:
            log.exception("sequence %d failed", seq.id)
            outputs.append(self._fail(seq, e))
            return FAILED

    def _fail(self, seq: Sequence, error: Exception) -> StepOutput:
        seq.finish_reason = "error"
        seq.error = f"{type(error).__name__}: {error}"
        out = StepOutput(seq.id, [], "")
        if seq.id in self.seqs:  # (it may have failed after it finished: then it is already gone)
            self._finish(seq, out, failed=True)
        else:
            out.finish_reason, out.completion = "error", seq.completion()
        return out

    def _start(self, seq: Sequence) -> None:
        policy = seq.kv.policy if seq.kv is not None else None
        self.cache.set_format(seq.slot, policy and policy.quant, policy.recent if policy else 0)
        seq.strategy = seq.request.strategy()
        seq.strategy.start(seq)

    def _after_forward(self, task: Task, logits: torch.Tensor, forward_s: float,
                       queries: list[torch.Tensor] | None) -> StepOutput | None:
        first = task.seq.computed + (task.segment_capture or 0)  # token position of its first captured row
        out = self._accept(task, logits, forward_s)
        if task.seq.kv is not None and task.seq.finish_reason is None:
            self._kv_step(task.seq, queries, first)
        return out

    def _decide(self, seq: Sequence) -> StepOutput:
        tokens, logits = seq.strategy.decide(seq)
        return self._advance(seq, tokens, logits, list(range(len(tokens))))

    # ------------------------------------------------------------------ KV policies

    @staticmethod
    def _captured(batch: Batch) -> dict[int, list[torch.Tensor]]:
        """Per segment that asked (`Segment.capture_from`), its rows' queries in every layer."""
        out, at = {}, 0
        for i, rows in batch.capture.items():
            n = rows.stop - rows.start
            out[i] = [q[at:at + n] for q in batch.queries]
            at += n
        return out

    def _kv_step(self, seq: Sequence, queries: list[torch.Tensor] | None, first: int) -> None:
        """After a sequence's step: keep its prompt window's queries; at the end of the prompt, and
        then while decoding, let its policy drop entries (`kv_policy.py`)."""
        state = seq.kv
        if not state.prompt_done:
            if queries is not None:
                state.absorb(queries, first)
            if seq.computed < seq.prompt_len:
                return
            state.prompt_done = True
            if state.policy.name == "h2o" and state.window:
                kv_policy.accumulate(seq.slot, state, self.cache, [torch.cat(w) for w in state.window],
                                     state.window_first)
            kv_policy.compress(seq.slot, state, self.cache, decoding=False)
            state.window = []
            return
        if queries is not None:
            kv_policy.accumulate(seq.slot, state, self.cache, queries, first)
        kv_policy.compress(seq.slot, state, self.cache, decoding=True)

    # ------------------------------------------------------------------ one sequence's step

    def _accept(self, task: Task, logits: torch.Tensor, forward_s: float) -> StepOutput | None:
        seq = task.seq
        seq.stats.work.target_rows += task.take + (len(task.proposal.tokens) if task.proposal else 0)
        if task.proposal is None:  # a chunk of what it has to read: no tokens yet
            seq.computed += task.take
            return None
        root = seq.computed + task.take - 1
        verdict = seq.strategy.accept(seq, logits, task.proposal, forward_s)
        nodes = [0] + [i + 1 for i in verdict.path]  # the rows each new token was chosen at
        self.cache.keep(seq.slot, root, nodes)
        seq.computed = root + len(nodes)
        seq.stats.work.target_forwards += 1
        return self._advance(seq, verdict.tokens, logits, nodes)

    def _advance(self, seq: Sequence, tokens: list[int], logits: torch.Tensor, rows: list[int]) -> StepOutput:
        """Append new tokens through the stop rules (token i was chosen from `logits[rows[i]]`)."""
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
        out = StepOutput(seq.id, kept, text)
        if seq.logprobs is not None and kept:
            out.logprobs = self._logprobs(logits[rows[:len(kept)]], kept, params.logprobs)
            seq.logprobs += out.logprobs
        if seq.finish_reason:
            self._finish(seq, out)
        return out

    def _finish(self, seq: Sequence, out: StepOutput, failed: bool = False) -> None:
        """End a sequence and free its slot; a failed one skips its own wrap-up (that may be what
        failed) and leaves nothing in its slot for the prefix cache (its entries may be half-written)."""
        seq.stats.timing.finished = time.perf_counter()
        if not failed:
            if seq.slot is not None:  # what its cache held at the end, before the slot is released
                c, st = self.cache, seq.stats
                st.kv_entries = c.held(seq.slot)
                st.kv_bytes = c.held_bytes(seq.slot)
                st.kv_full_bytes = c.tokens(seq.slot) * c.bytes_per_token
            out.text += seq.text.flush()
            if seq.strategy is not None:
                seq.strategy.finish(seq)
        self.scheduler.remove(seq, keep=not failed)
        del self.seqs[seq.id]
        out.finish_reason = seq.finish_reason
        out.completion = seq.completion()

    def _logprobs(self, logits: torch.Tensor, tokens: list[int], top: int) -> list[Logprob]:
        """The target's (or, for lossy EAD's small turns, the small model's) log-probabilities of the
        chosen tokens and the `top` likeliest ones, from the raw logits (temperature 1, no top-k/p)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        tops = logp.topk(min(top, logp.shape[-1]), dim=-1) if top else None
        out = []
        for i, (t, lp) in enumerate(zip(tokens, chosen)):
            alts = [] if tops is None else [self._entry(a, v) for a, v in
                                            zip(tops.indices[i].tolist(), tops.values[i].tolist())]
            out.append(self._entry(t, lp, alts))
        return out

    def _entry(self, token: int, logprob: float, top: list[Logprob] | None = None) -> Logprob:
        raw = self.tokenizer.token_bytes(token)
        return Logprob(token, raw.decode("utf-8", errors="replace"), logprob, list(raw), top or [])
