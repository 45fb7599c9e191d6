"""Names compared the way people read them: a confusable-insensitive skeleton (UTS #39).

`skeleton(name)` is what the node compares before it pins a NEW name: two names with the
same skeleton look alike on a screen (`alice`, `ALICE`, `alice.`, `a1ice`, `aIice`;
`b0b`, `bob`; `rnallory`, `mallory`), so only the first of them may be pinned.

How it is built, from the `confusable_homoglyphs` package's copy of Unicode's
confusables.txt (which lists each pair both ways; a character with one entry that lists
it back is a source, its entry its prototype):
- Each character is mapped to its confusable prototype (`0` -> `O`, `I` -> `l`,
  `1` -> `l`, Cyrillic `а` -> `a`, `m` -> `rn`).
- Case is ignored too: ASCII letters are folded. Since `I` is `i` up to case and `l` up
  to shape, both rules together make `i`, `I`, `l`, `L` and `1` one class (so `aiice`
  collides with `alice`), and `o`, `O`, `0` another. Folding only ASCII keeps the classes
  small: folding every character chains through the rarer letters until `dave` equals
  `dane`. Names are ASCII today (dm.datadir.NAME_PATTERN); the rest is for a wider set.
- Each class is written as one representative (an ASCII lower-case letter when it has one).
- The separators `.`, `-` and `_` are dropped.

Pure functions; the tables are built once (about 0.1 s), on first use, then only read.
"""
from __future__ import annotations

import functools
import unicodedata

SEPARATORS = frozenset(".-_")
_MARKS = "\u200e\u200f"  # the package wraps right-to-left characters in direction marks


@functools.cache
def _tables() -> tuple[dict[str, str], dict[str, str]]:
    """(character -> its class's representative, character -> its multi-character prototype)."""
    from confusable_homoglyphs.confusables import confusables_data

    listed = {key.strip(_MARKS): [entry["c"].strip(_MARKS) for entry in entries]
              for key, entries in confusables_data.items()}
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    sequences: dict[str, str] = {}
    for char, glyphs in listed.items():
        if len(char) != 1 or len(glyphs) != 1 or not glyphs[0]:
            continue  # a prototype (it lists its sources), or a prototype sequence
        prototype = glyphs[0]
        if len(prototype) > 1:
            sequences[char] = prototype  # sources are single characters: `char` maps to this
        else:  # a pair listing only each other is one class either way
            union(char, prototype)
    for code in range(128):
        union(chr(code), chr(code).lower())

    def preference(c: str) -> tuple:
        return (not ("a" <= c <= "z"), not (c.isascii() and c.isalnum()), not c.isascii(), c)

    groups: dict[str, list[str]] = {}
    for c in list(parent):
        groups.setdefault(find(c), []).append(c)
    representative = {}
    for group in groups.values():
        best = min(group, key=preference)
        representative.update(dict.fromkeys(group, best))
    return representative, sequences


def _map(c: str, representative: dict, sequences: dict) -> str:
    if c in sequences:
        return "".join(_map(s, representative, {}) for s in sequences[c])
    if c in representative:
        return representative[c]
    folded = c.casefold()
    return "".join(representative.get(f, f) for f in folded)


def skeleton(name: str) -> str:
    """The confusable-insensitive form of `name`: equal skeletons mean look-alike names."""
    representative, sequences = _tables()
    mapped = "".join(_map(c, representative, sequences) for c in unicodedata.normalize("NFD", name))
    return "".join(c for c in unicodedata.normalize("NFD", mapped) if c not in SEPARATORS)
