"""Drafters: everything that proposes tokens for the target model to verify.

A drafter is any object with `fork`, `reset`, `propose` and `observe` (the `Drafter` protocol,
in `base`); drafters are handed their models by whoever builds them (`strategies.make_drafter`)
and never import the engine. Model drafters return the distribution each token was drawn from,
so rejection sampling can stay exact; the others are deterministic and return none (the verifier treats them as
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

from .base import Drafter, DraftLength, Proposal, Verdict
from .lookup import LookupDrafter
from .model import ModelDrafter
from .recycling import Recycling
from .suffix import Suffix
from .tree import TreeDrafter

__all__ = [
    "DraftLength",
    "Drafter",
    "LookupDrafter",
    "ModelDrafter",
    "Proposal",
    "Recycling",
    "Suffix",
    "TreeDrafter",
    "Verdict",
]
