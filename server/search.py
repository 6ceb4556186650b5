"""Catalogue search in plain words (Tool/List's and Tool/Explore's `search`): what Wiro's official MCP server sends
for recommend_model("turn an image into a disintegration video") must find an image-to-video disintegration tool.

A query and a tool's texts are reduced to the same terms: lower-case words, stop words dropped, a simple suffix
stemmer ("disintegration", "disintegrating", "disintegrates" -> "disintegr"). A tool is listed when at least half
of the query's terms are in its texts; it is ranked by where they are (title above categories and tags, above the
description, above the example prompts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_STOP_TEXT = """
a about all an and any anything are as at be by can could do does for from get give how i in into is it its just
like make me my of on onto or please some something that the then this to turn turns up using via want what which
with would you your
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())
"""Words that say nothing about a tool ("turn an image into a video": image and video do)."""

_WORD = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ization", "ation", "izing", "ating", "ized", "ated", "ment", "ness", "ize", "ate", "ing", "ed", "er",
             "ly")
"""Longest first; stripped at most twice (after the plural), never below MIN_STEM letters."""
MIN_STEM = 3
MATCH_FRACTION = 0.5
"""A tool is listed when at least this fraction of the query's terms are found in its texts."""


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > MIN_STEM:
        return word[:-1]
    return word


def stem(word: str) -> str:
    """A crude English stem, the same for a word's common forms (enough for catalogue search, no dictionary):
    "disintegration", "disintegrates" -> "disintegr"; "particles", "particle" -> "particl"."""
    word = _singular(word)
    for _ in range(2):
        suffix = next((x for x in _SUFFIXES if word.endswith(x) and len(word) - len(x) >= MIN_STEM), None)
        if suffix is None:
            break
        word = word[: -len(suffix)]
    if len(word) > MIN_STEM and word.endswith("e"):
        word = word[:-1]  # "image" and "imag(ing)" meet
    if len(word) > MIN_STEM and word[-1] == word[-2]:
        word = word[:-1]  # "crystall(ize)" and "crystal", "fall(ing)" and "fall" meet
    return word


def terms(text: str) -> list[str]:
    """The stems of `text`'s words that are not stop words, each once, in order."""
    found: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if word not in STOP_WORDS:
            found.setdefault(stem(word), None)
    return list(found)


@dataclass(frozen=True)
class Document:
    """A tool's searchable texts as weighted sets of terms."""

    fields: tuple[tuple[frozenset[str], float], ...]

    @classmethod
    def of(cls, weighted: Iterable[tuple[Iterable[str], float]]) -> Document:
        """From (texts, weight) pairs, e.g. ([title], 5.0), (categories, 3.0)."""
        return cls(tuple((frozenset(t for text in texts for t in terms(text)), weight) for texts, weight in weighted))

    def score(self, query: str) -> float | None:
        """How well `query` fits: the mean, over its terms, of the weight of the heaviest field holding each (0 for
        one not found); None when fewer than MATCH_FRACTION of its terms are found. An empty query fits (inf)."""
        wanted = terms(query)
        if not wanted:
            return math.inf
        weights = [max((w for field, w in self.fields if term in field), default=0.0) for term in wanted]
        if sum(w > 0 for w in weights) < MATCH_FRACTION * len(wanted):
            return None
        return sum(weights) / len(wanted)


def rank(query: str, candidates: Iterable[tuple[T, Document]]) -> list[T]:
    """The candidates that fit `query`, best first (ties keep their order)."""
    scored = [(doc.score(query), index, item) for index, (item, doc) in enumerate(candidates)]
    hits = sorted(((score, index, item) for score, index, item in scored if score is not None),
                  key=lambda hit: (-hit[0], hit[1]))
    return [item for _, _, item in hits]
