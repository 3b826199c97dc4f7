"""Suffix retrieval (as in SAM-Decoding): a suffix automaton finds the longest earlier match of
the context's end, and every distinct token that followed it starts a branch of the draft tree.

The automaton over prompt + generated tokens grows online, one state or two per token, so the
longest match is found in O(1) instead of by scanning n-grams. A corpus file adds a second,
static automaton (a datastore), matched by walking the context's last tokens through it.
"""

from __future__ import annotations

import torch

MATCH_TAIL = 32  # context tokens walked through the corpus automaton per step


class SuffixAutomaton:
    """States hold their outgoing transitions, suffix link, longest length and the end position
    of their first occurrence in `text`."""

    def __init__(self, tokens: list[int] = ()):
        self.next: list[dict[int, int]] = [{}]
        self.link, self.len, self.first = [-1], [0], [-1]
        self.last = 0
        self.text: list[int] = []
        for t in tokens:
            self.extend(t)

    def _state(self, length: int, first: int, link: int = -1, nxt: dict | None = None) -> int:
        self.next.append({} if nxt is None else dict(nxt))
        self.link.append(link)
        self.len.append(length)
        self.first.append(first)
        return len(self.len) - 1

    def extend(self, c: int) -> None:
        pos = len(self.text)
        self.text.append(c)
        cur = self._state(self.len[self.last] + 1, pos)
        p = self.last
        while p != -1 and c not in self.next[p]:
            self.next[p][c] = cur
            p = self.link[p]
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][c]
            if self.len[p] + 1 == self.len[q]:
                self.link[cur] = q
            else:
                clone = self._state(self.len[p] + 1, self.first[q], self.link[q], self.next[q])
                while p != -1 and self.next[p].get(c) == q:
                    self.next[p][c] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur

    def repeat(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also occurs earlier in it."""
        s = self.link[self.last] if self.last else 0
        return max(s, 0), self.len[max(s, 0)]

    def match(self, tokens: list[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of `tokens` that occurs in the text."""
        s = length = 0
        for c in tokens:
            while s and c not in self.next[s]:
                s = self.link[s]
                length = self.len[s]
            if c in self.next[s]:
                s, length = self.next[s][c], length + 1
        return s, length

    def branches(self, state: int, width: int, depth: int) -> list[list[int]]:
        """Up to `width` continuations of the match, one per distinct next token, latest first."""
        targets = sorted(self.next[state].values(), key=lambda t: -self.first[t])[:width]
        return [self.text[self.first[t] : self.first[t] + max(1, depth >> r)] for r, t in enumerate(targets)]


class Suffix:
    """Branch keys (source, match length bucket, branch rank, depth) let the tree drafter learn how
    far each kind of branch is worth trusting."""

    name = "suffix"

    def __init__(self, corpus: list[int] | None = None, width: int = 4, depth: int = 8):
        self.width, self.depth = width, depth
        self.corpus = SuffixAutomaton(corpus) if corpus else None
        self.reset([])

    def fork(self) -> "Suffix":
        """Its own automaton over the new sequence's context; the corpus automaton is shared."""
        other = Suffix(None, self.width, self.depth)
        other.corpus = self.corpus
        return other

    def reset(self, prompt: list[int]) -> None:
        self.sam = SuffixAutomaton()

    def grow(self, context: list[int], limit: int) -> tuple[list[int], list[int], list]:
        for t in context[len(self.sam.text) :]:
            self.sam.extend(t)
        found = [("context", self.sam, *self.sam.repeat())]
        if self.corpus is not None:
            found.append(("corpus", self.corpus, *self.corpus.match(context[-MATCH_TAIL:])))
        tokens, parents, keys = [], [], []
        for source, sam, state, length in found:
            if length == 0:
                continue
            for rank, branch in enumerate(sam.branches(state, self.width, self.depth)):
                for d, t in enumerate(branch):
                    parents.append(0 if d == 0 else len(tokens))
                    tokens.append(t)
                    keys.append((source, min(length, 8), rank, d))
        return tokens[:limit], parents[:limit], keys[:limit]

    def learn(self, tree: list[int], target_logits: torch.Tensor) -> None:
        pass  # the automaton learns from the context itself
