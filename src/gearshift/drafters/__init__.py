"""Drafters: everything that proposes tokens for the target model to verify.

A drafter is any object with `reset`, `propose` and `observe` (the `Drafter` protocol, in
`base`). Model drafters return the distribution each token was drawn from, so rejection sampling
can stay exact; the others are deterministic and return none (the verifier treats them as
one-hot). Chain drafters adapt their length online through `DraftLength`; tree drafters size
each tree against the measured cost of a target forward (`tree`).

    lookup              n-gram match over prompt + generated tokens (prompt lookup decoding)   lookup.py
    early-exit:L        the target's first L layers + its final norm and LM head (no extra weights)  model.py
    early-exit:DIR      the same with a trained exit head (gearshift distill --early-exit)        model.py
    model:PATH          a separate, smaller model sharing the tokenizer (its own KV cache)      model.py
    recycling[:PATH]    Token Recycling: a tree from the target's recycled top-k successors    recycling.py
    suffix[:CORPUS]     suffix automaton over prompt + generated text (+ a corpus file)        suffix.py
    hybrid              recycling and suffix trees merged, each weighted by what it gets accepted  tree.py
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GearshiftError
from .base import DraftLength, Drafter, Proposal, Verdict
from .lookup import LookupDrafter
from .model import ModelDrafter
from .recycling import Recycling
from .suffix import Suffix
from .tree import TreeDrafter

__all__ = ["DraftLength", "Drafter", "LookupDrafter", "ModelDrafter", "Proposal", "Recycling", "Suffix",
           "TreeDrafter", "Verdict", "make_drafter"]


def make_drafter(spec: str, llm) -> Drafter:
    """Build a drafter from its command-line name for the target `llm`."""
    from ..engine import load
    from ..hardware import forward_costs

    vocab = llm.model.cfg.vocab_size
    if spec == "auto":
        spec = "lookup"
    if spec == "lookup":
        return LookupDrafter()
    if spec.startswith("early-exit:") and not spec.partition(":")[2].isdigit():  # a trained exit head
        from ..distill import load_exit
        layers, head = load_exit(Path(spec.partition(":")[2]), llm)
        return ModelDrafter(llm.model, vocab, spec, n_layers=layers, head=head)
    if spec.startswith("early-exit"):
        layers = spec.partition(":")[2] or str(default_exit_layer(llm.model.cfg.n_layers))
        if not layers.isdigit() or not 1 <= int(layers) < llm.model.cfg.n_layers:
            raise GearshiftError(f"early-exit needs a layer count from 1 to {llm.model.cfg.n_layers - 1}, got {layers!r}")
        return ModelDrafter(llm.model, vocab, f"early-exit:{layers}", n_layers=int(layers))
    if spec.startswith("model:"):
        # a draft only has to be fast (verification keeps the output exact): int8 on a CPU
        draft = load(spec[len("model:"):], device=str(llm.device), weights="int8" if llm.device.type == "cpu" else "auto")
        if draft.tokenizer.backend.get_vocab() != llm.tokenizer.backend.get_vocab():
            common = set(draft.tokenizer.backend.get_vocab().items()) & set(llm.tokenizer.backend.get_vocab().items())
            if len(common) < 0.9 * min(vocab, draft.model.cfg.vocab_size):
                raise GearshiftError("the draft model does not share the target's tokenizer")
        return ModelDrafter(draft.model, vocab, spec)
    kind, _, arg = spec.partition(":")
    if kind in ("recycling", "suffix", "hybrid"):
        growers = []
        if kind in ("recycling", "hybrid"):
            growers.append(Recycling(vocab, path=arg if kind == "recycling" and arg else None))
        if kind in ("suffix", "hybrid"):
            growers.append(Suffix(corpus=llm.tokenizer.encode(_read_corpus(arg)) if kind == "suffix" and arg else None))
        return TreeDrafter(spec, growers, forward_costs(llm.model, str(llm.loaded.path)))
    raise GearshiftError(f"unknown drafter {spec!r}; choose lookup, early-exit[:L], model:PATH, recycling[:PATH], "
                         "suffix[:CORPUS], hybrid or auto")


def _read_corpus(path: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise GearshiftError(f"cannot read the suffix corpus {path}: {e}") from None


def default_exit_layer(n_layers: int) -> int:
    """Measured on SmolLM2-135M (30 layers; Spec-Bench, 1 question per category): L=4 gave 0.83x,
    8: 0.68x, 12: 0.61x, 16: 0.61x, 20: 0.74x; untrained exits draft poorly, so shallow is cheapest."""
    return max(1, n_layers // 7)
