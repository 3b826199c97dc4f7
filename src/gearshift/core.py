"""The engine core: many sequences, one step loop.

`add` turns a request into a sequence, `step` advances every running sequence by one step and
returns what each produced, `abort` ends one at once (its slot is free for the next), and
`has_work` says whether anything is left. The core wires the parts and owns the step loop; the
scheduler decides (`scheduler.py`), the model runner carries it out on the model and the KV cache
(`runner.py`), output processing applies stop rules and detokenizes (`output.py`). A step,
whatever strategies the sequences use:

1. admit waiting sequences into free KV cache slots, each starting from the longest prefix of
   its prompt already computed (the prefix index decides, `prefix_cache.py`; the runner copies);
2. plan: every running sequence gets rows under the step's token budget: the tokens it has not
   read yet (a prompt chunk, a catch-up, the last token), and, once caught up, room for a draft,
   which the runner asks its strategy to fill (`strategies.py`);
3. one target forward over all of those rows (`runner.forward`: linear layers once for the
   whole batch, attention per row within each sequence's slot);
4. each caught-up sequence's strategy verifies its rows and keeps what it accepts (the runner
   keeps the accepted path in the slot); its KV policy drops entries if due (`kv_policy.py`);
   sequences that decode without the target (lossy EAD's small turns) do so;
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

from .config import EngineConfig
from .errors import GearshiftError
from .model import Transformer
from .output import Outputs
from .prefix_cache import PrefixCache
from .runner import ModelRunner
from .scheduler import Scheduler, Task
from .sequence import Request, Sequence, Status, StepOutput
from .slots import Slots
from .tokenizer import Tokenizer

log = logging.getLogger("gearshift.core")
FAILED = object()  # what `_isolated` returns when the sequence's own work raised


class EngineCore:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, eos_ids: set[int], config: EngineConfig | None = None):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.config = config or EngineConfig()
        self.window = min(model.cfg.max_seq_len, self.config.max_model_len or model.cfg.max_seq_len)
        self.cache = model.new_cache(self.config.max_num_seqs, self.window)
        self.slots = Slots(self.config.max_num_seqs)
        self.prefix = PrefixCache(self.cache, self.slots, self.config.prefix_cache_bytes, self.config.prefix_cache)
        self.scheduler = Scheduler(self.config, self.prefix, self.window)
        self.runner = ModelRunner(model, self.cache, self.prefix, exact=self.config.exact)
        self.outputs = Outputs(tokenizer, eos_ids)
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
        # a policy's drops would shift the positions a sliding window counts from; re-rotating kept keys
        # (streaming) would rotate a NoPE layer's
        kind = "sliding-window" if any(self.cache.windows) else "NoPE" if self.model.cfg.no_rope else None
        if request.kv is not None and request.kv.active and kind:
            raise GearshiftError(
                f"KV policy {request.kv.label!r} does not apply to {self.model.cfg.arch} (it has {kind} layers)"
            )

    def add(self, request: Request) -> int:
        """Queue a request; returns its sequence id. It starts at a step boundary, when a slot is free."""
        self.check(request)
        seq = Sequence(next(self._ids), request, self.window, self.model.device)
        self.outputs.start(seq)
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
        return self.runner.held(list(self.scheduler.running))

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running sequence by one step; the outputs of the sequences that moved."""
        outputs, self._ended = self._ended, []
        now = time.perf_counter()
        for seq, hit in self.scheduler.admit():
            seq.stats.timing.admitted = now
            self._isolated(seq, outputs, self._start, seq, hit)
        plan = self.scheduler.plan()
        self.runner.copy(plan.copies)
        tasks, failed = self.runner.propose(plan.tasks)
        for seq, error in failed:  # its strategy could not propose
            outputs.append(self._fail(seq, error))
        if tasks:
            fwd = self.runner.forward(tasks)
            for task, logits, queries, feats in zip(tasks, fwd.logits, fwd.queries, fwd.features):
                out = self._isolated(task.seq, outputs, self._after_forward, task, logits, fwd.seconds, queries, feats)
                if out is not None and out is not FAILED:
                    outputs.append(out)
        for seq in plan.alone:
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

    def _start(self, seq: Sequence, hit) -> None:
        self.runner.admit(seq, hit)
        seq.strategy = seq.request.strategy()
        seq.strategy.start(seq)

    def _after_forward(
        self,
        task: Task,
        logits: torch.Tensor,
        forward_s: float,
        queries: list[torch.Tensor] | None,
        features: torch.Tensor | None,
    ) -> StepOutput | None:
        if features is not None:  # its drafter reads the target's features (rows from task.start on)
            task.seq.strategy.see(task.seq, task.start, task.take, features)
        out = self._accept(task, logits, forward_s)
        seq = task.seq
        if seq.kv is not None and seq.finish_reason is None:
            first = task.start + (task.capture_from or 0)  # token position of its first captured row
            if queries is not None and task.proposal is not None and task.proposal.tokens:
                # the rows plain decoding would have run: the step's own and the accepted drafts'
                own = task.take - (task.capture_from or 0)
                rows = list(range(own)) + [own + i for i in task.accepted]
                queries = [q[rows] for q in queries]
            seq.kv.after_step(self.cache, seq.slot, queries, first, seq.computed, seq.prompt_len)
        return out

    def _decide(self, seq: Sequence) -> StepOutput:
        tokens, logits = seq.strategy.decide(seq)
        return self._advance(seq, tokens, logits, list(range(len(tokens))))

    # ------------------------------------------------------------------ one sequence's step

    def _accept(self, task: Task, logits: torch.Tensor, forward_s: float) -> StepOutput | None:
        seq = task.seq
        seq.stats.work.target_rows += task.take + (len(task.proposal.tokens) if task.proposal else 0)
        if task.proposal is None:  # a chunk of what it has to read: no tokens yet (its slot counts it)
            return None
        root = task.start + task.take - 1
        verdict = seq.strategy.accept(seq, logits, task.proposal, forward_s)
        task.accepted = verdict.path
        nodes = [0] + [i + 1 for i in verdict.path]  # the rows each new token was chosen at
        self.runner.keep(seq, root, nodes)
        seq.stats.work.target_forwards += 1
        return self._advance(seq, verdict.tokens, logits, nodes)

    def _advance(self, seq: Sequence, tokens: list[int], logits: torch.Tensor, rows: list[int]) -> StepOutput:
        out = self.outputs.advance(seq, tokens, logits, rows)
        if seq.finish_reason:
            self._finish(seq, out)
        return out

    def _finish(self, seq: Sequence, out: StepOutput, failed: bool = False) -> None:
        """End a sequence and free its slot; a failed one skips its own wrap-up (that may be what
        failed) and leaves nothing in its slot for the prefix cache (its entries may be half-written)."""
        seq.stats.timing.finished = time.perf_counter()
        if not failed:
            if seq.slot is not None and seq.cache is not None:  # what its cache held at the end
                c, st = self.cache, seq.stats
                st.kv_entries = c.held(seq.slot)
                st.kv_bytes = c.held_bytes(seq.slot)
                st.kv_full_bytes = c.tokens(seq.slot) * c.bytes_per_token
            out.text += self.outputs.flush(seq)
            if seq.strategy is not None:
                seq.strategy.finish(seq)
        self.scheduler.remove(seq)
        self.runner.release(seq, keep=not failed)
        seq.status = Status.FINISHED
        del self.seqs[seq.id]
        out.finish_reason = seq.finish_reason
        out.completion = seq.completion()
