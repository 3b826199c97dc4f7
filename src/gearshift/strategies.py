"""Decoding strategies: what one step of one sequence does around the batched target forward.

`EngineCore.step` asks each running sequence's strategy what it needs, runs the target once for
all of them, and hands every strategy its rows of logits back. The loop never asks which
strategy it holds; a strategy answers:

- `uses_target(seq)`: does the sequence read the target this step (lossy EAD's small turns do not);
- `draft_room(seq, room)`: how many draft rows it wants of the `room` the step has left (the
  scheduler keeps them in its budget), and `propose(seq, k)`: at most that many tokens to score
  after the last one, a chain or a tree (none for plain), drafted by the model runner;
- `accept(seq, logits, proposal, forward_s)`: what to keep, through the one verification routine
  (`verify`), which is also plain sampling when nothing was proposed;
- `decide(seq)`: the tokens it makes without the target, with the logits they came from;
- `see(seq, start, take, features)`: the target's features of its rows (last-block outputs, from
  token position `start`: `take` plain rows, then the draft's), for drafters that read them;
- `start(seq)` / `finish(seq)`: per-sequence set-up, and its own stats (EAD's cost report).

Strategies are made per sequence (drafters forked, see `Drafter.fork`), by the factory a request
carries; `make_drafter` turns a command-line name into the drafter a factory forks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from .drafters import Drafter, LookupDrafter, ModelDrafter, Proposal, Recycling, Suffix, TreeDrafter, Verdict
from .drafters.eagle import EagleDrafter, load_head
from .ead import EAD, EntropyGate, Schedule, forward_flops
from .errors import GearshiftError
from .hardware import forward_costs
from .loading import load, load_exit_head
from .model import Transformer
from .sampling import entropy
from .stats import EADCost, Speculation
from .tokenizer import Tokenizer
from .verify import verify

if TYPE_CHECKING:
    from .sequence import Sequence

NOTHING = Proposal([])


class Strategy(Protocol):
    name: str

    def start(self, seq: Sequence) -> None: ...

    wants_features: bool  # the model runner returns the target's features of its rows (`see`)

    def uses_target(self, seq: Sequence) -> bool: ...

    def see(self, seq: Sequence, start: int, take: int, features: torch.Tensor) -> None: ...

    def draft_room(self, seq: Sequence, room: int) -> int: ...

    def propose(self, seq: Sequence, k_max: int) -> Proposal: ...

    def accept(self, seq: Sequence, logits: torch.Tensor, proposal: Proposal, forward_s: float) -> Verdict: ...

    def decide(self, seq: Sequence) -> tuple[list[int], torch.Tensor]: ...

    def finish(self, seq: Sequence) -> None: ...


class Speculative:
    """Plain decoding (no drafter) and speculative decoding with any drafter, chains and trees:
    draft, score `[last token] + draft` in the shared forward, keep what `verify` accepts."""

    def __init__(self, drafter: Drafter | None):
        self.drafter = drafter
        self.name = drafter.name if drafter is not None else "plain"
        self.drafted = False  # whether the drafter proposed this step (it then hears the verdict)
        self.wants_features = bool(getattr(drafter, "reads_features", False))  # a draft head (EAGLE)

    def see(self, seq: Sequence, start: int, take: int, features: torch.Tensor) -> None:
        self.drafter.see(start, take, features)

    def start(self, seq: Sequence) -> None:
        if self.drafter is not None:
            self.drafter.reset(seq.tokens)
            seq.stats.spec = Speculation()

    def uses_target(self, seq: Sequence) -> bool:
        return True

    def draft_room(self, seq: Sequence, room: int) -> int:
        return min(self.drafter.length.k, room) if self.drafter is not None else 0

    def propose(self, seq: Sequence, k_max: int) -> Proposal:
        k = min(self.drafter.length.k, k_max) if self.drafter is not None else 0
        self.drafted = k > 0
        if not self.drafted:
            return NOTHING
        t0 = time.perf_counter()
        proposal = self.drafter.propose(seq.tokens, k, seq.params, seq.gen).first(k)
        seq.stats.spec.draft_s += time.perf_counter() - t0
        return proposal

    def accept(self, seq: Sequence, logits: torch.Tensor, proposal: Proposal, forward_s: float) -> Verdict:
        t0 = time.perf_counter()
        verdict = verify(logits, proposal, seq.params, seq.gen)
        if self.drafted:
            self.drafter.observe(verdict, logits)
            self.drafter.length.update(len(proposal.tokens), verdict.accepted)
        if seq.stats.spec is not None:
            s = seq.stats.spec
            s.drafts += bool(proposal.tokens)
            s.proposed += len(proposal.tokens)
            s.accepted += verdict.accepted
            s.verify_s += forward_s + time.perf_counter() - t0
        return verdict

    def decide(self, seq: Sequence) -> tuple[list[int], torch.Tensor]:
        raise RuntimeError("speculative decoding always reads the target")

    def finish(self, seq: Sequence) -> None:
        pass


class EntropyAdaptive:
    """Lossy EAD (`ead.py`): the model the schedule names writes the next token. The large model's
    turn is an ordinary target step whose rows are everything it has not read yet (its catch-up,
    chunked like a prefill, the prompt included on its first turn: a model that never gets a turn
    never reads it); the small model catches up inside `decide`. The large model's own token comes
    from the same one-row computation as plain decoding, so tau 0 is plain decoding bit for bit."""

    def __init__(self, small: ModelDrafter, cfg: EAD, large_flops: float):
        self.small, self.schedule = small, Schedule(cfg)
        self.wants_features = False
        self.name = f"ead:{small.name}"
        self.large_flops, self.small_flops = large_flops, forward_flops(small.model, small.n_layers)

    def start(self, seq: Sequence) -> None:
        self.small.reset(seq.tokens)
        self.schedule.reset()
        seq.stats.ead = EADCost()

    def uses_target(self, seq: Sequence) -> bool:
        return self.schedule.large

    def draft_room(self, seq: Sequence, room: int) -> int:
        return 0

    def propose(self, seq: Sequence, k_max: int) -> Proposal:
        return NOTHING

    def accept(self, seq: Sequence, logits: torch.Tensor, proposal: Proposal, forward_s: float) -> Verdict:
        self.schedule.push(entropy(logits[0]))
        seq.stats.ead.large_tokens += 1
        return verify(logits, proposal, seq.params, seq.gen)

    def decide(self, seq: Sequence) -> tuple[list[int], torch.Tensor]:
        logits = self.small.logits(seq.tokens[self.small.cached :])[None]
        self.schedule.push(entropy(logits[0]))
        seq.stats.ead.small_tokens += 1
        return verify(logits, NOTHING, seq.params, seq.gen).tokens, logits

    def finish(self, seq: Sequence) -> None:
        e, w = seq.stats.ead, seq.stats.work
        e.flops = self.large_flops * w.target_rows + self.small_flops * self.small.read
        e.large_only_flops = self.large_flops * (seq.prompt_len - 1 - seq.stats.cached_tokens + w.produced)


class VerifiedEAD(Speculative):
    """`ead+verify`: EAD's schedule as speculative decoding (the small model's tokens are drafts the
    large one verifies), so the output is the large model's at any tau; it reports EAD's costs."""

    def __init__(self, gate: EntropyGate, large_flops: float):
        super().__init__(gate)
        self.large_flops = large_flops
        self.small_flops = forward_flops(gate.inner.model, gate.inner.n_layers)

    def start(self, seq: Sequence) -> None:
        super().start(seq)
        seq.stats.ead = EADCost()

    def finish(self, seq: Sequence) -> None:
        """The small model produced the draft tokens the large one accepted, the large model every
        other token. Compute counts every token each model read, the large model's whole drafts
        included, against the large model alone reading the prompt and the output."""
        e, s, w = seq.stats.ead, seq.stats.spec, seq.stats.work
        e.small_tokens, e.large_tokens = s.accepted, w.target_forwards
        e.flops = self.large_flops * w.target_rows + self.small_flops * self.drafter.inner.read
        e.large_only_flops = self.large_flops * (
            seq.prompt_len - 1 - seq.stats.cached_tokens + s.accepted + w.target_forwards
        )


def strategy_factory(
    target: Transformer,
    drafter: Drafter | None = None,
    ead: tuple[ModelDrafter, EAD] | None = None,
    k: int | None = None,
) -> Callable[[], Strategy]:
    """What a request carries: a maker of per-sequence strategies, each with its own fork of the
    drafter (forked when the sequence starts, on the engine's side), its draft length capped at `k`."""
    if ead is not None:
        small, cfg = ead
        if cfg.verify:
            return lambda: VerifiedEAD(EntropyGate(small.fork(), cfg), forward_flops(target))
        return lambda: EntropyAdaptive(small.fork(), cfg, forward_flops(target))
    if drafter is None:
        return lambda: Speculative(None)
    return lambda: Speculative(_capped(drafter.fork(), k))


def _capped(drafter: Drafter, k: int | None) -> Drafter:
    if k is not None:
        n = drafter.length
        drafter.length = replace(n, k=min(n.k, k), k_min=min(n.k_min, k), k_max=k)
    return drafter


# ---------------------------------------------------------------- drafters by name


def make_drafter(spec: str, target: Transformer, tokenizer: Tokenizer, target_path: Path) -> Drafter:
    """Build a drafter from its command-line name for `target` (loaded from `target_path`)."""
    vocab = target.cfg.vocab_size
    if spec == "auto":
        spec = "lookup"
    if spec == "lookup":
        return LookupDrafter()
    if spec.startswith("early-exit:") and not spec.partition(":")[2].isdigit():  # a trained exit head
        layers, head = load_exit_head(Path(spec.partition(":")[2]), target_path, target)
        return ModelDrafter(target, vocab, spec, n_layers=layers, head=head)
    if spec.startswith("early-exit"):
        layers = spec.partition(":")[2] or str(default_exit_layer(target.cfg.n_layers))
        if not layers.isdigit() or not 1 <= int(layers) < target.cfg.n_layers:
            raise GearshiftError(f"early-exit needs a layer count from 1 to {target.cfg.n_layers - 1}, got {layers!r}")
        return ModelDrafter(target, vocab, f"early-exit:{layers}", n_layers=int(layers))
    if spec.startswith("eagle:"):  # a trained EAGLE head (gearshift distill --head eagle)
        head = load_head(Path(spec[len("eagle:") :]), target_path, target)
        return EagleDrafter(head, target.embed_rows, spec, forward_costs(target, str(target_path)))
    if spec.startswith("model:"):
        # a draft only has to be fast (verification keeps the output exact): int8 on a CPU
        draft = load(
            spec[len("model:") :], device=str(target.device), weights="int8" if target.device.type == "cpu" else "auto"
        )
        ours, theirs = tokenizer.backend.get_vocab(), draft.tokenizer.backend.get_vocab()
        if theirs != ours and len(set(theirs.items()) & set(ours.items())) < 0.9 * min(
            vocab, draft.model.cfg.vocab_size
        ):
            raise GearshiftError("the draft model does not share the target's tokenizer")
        return ModelDrafter(draft.model, vocab, spec)
    kind, _, arg = spec.partition(":")
    if kind in ("recycling", "suffix", "hybrid"):
        growers = []
        if kind in ("recycling", "hybrid"):
            growers.append(Recycling(vocab, path=arg if kind == "recycling" and arg else None))
        if kind in ("suffix", "hybrid"):
            growers.append(Suffix(corpus=tokenizer.encode(_read_corpus(arg)) if kind == "suffix" and arg else None))
        return TreeDrafter(spec, growers, forward_costs(target, str(target_path)))
    raise GearshiftError(
        f"unknown drafter {spec!r}; choose lookup, early-exit[:L], model:PATH, eagle:DIR, recycling[:PATH], "
        "suffix[:CORPUS], hybrid or auto"
    )


def _read_corpus(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise GearshiftError(f"cannot read the suffix corpus {path}: {e}") from None


def default_exit_layer(n_layers: int) -> int:
    """Measured on SmolLM2-135M (30 layers; Spec-Bench, 1 question per category): L=4 gave 0.83x,
    8: 0.68x, 12: 0.61x, 16: 0.61x, 20: 0.74x; untrained exits draft poorly, so shallow is cheapest."""
    return max(1, n_layers // 7)
