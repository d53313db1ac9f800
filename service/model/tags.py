"""An item's metadata as tags: what ACF's second content channel reads (``ACFConfig.tags``).

The same function turns a trained item's metadata (``items.csv``) and a new item's
(``POST /items``) into tags, so both are read alike:
- each genre is a tag, its name as given (``Comedy``);
- each word of the title, lower-cased, is a tag ``word:<w>`` (``word:toy``; the release year
  in a MovieLens title is a word too: ``word:1995``), and a year at the end of a title in
  parentheses also gives its decade, ``decade:1990s``, which an old film shares with more.

A model reads only the tags of its vocabulary (:func:`vocabulary`): the genres and, with
titles, the title tags that enough of its training items have, so a word seen once cannot
place a new item.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

WORD = re.compile(r"\w[\w']+")  # words of 2+ characters
YEAR = re.compile(r"\((\d{4})\)\s*$")  # "Toy Story (1995)"
TITLE_PREFIXES = ("word:", "decade:")
MIN_ITEMS = 2  # a title tag places items only when this many training items have it


def item_tags(title: str, genres: Iterable[str]) -> frozenset[str]:
    """The tags of an item with this title and these genres (see the module doc)."""
    tags = {g for g in genres if g}
    tags |= {f"word:{w}" for w in WORD.findall(title.lower())}
    year = YEAR.search(title)
    if year:
        tags.add(f"decade:{int(year[1]) // 10 * 10}s")
    return frozenset(tags)


def is_title_tag(tag: str) -> bool:
    return tag.startswith(TITLE_PREFIXES)


def vocabulary(tags: Sequence[Iterable[str]], *, titles: bool) -> tuple[str, ...]:
    """The tags a model trained on items with these ``tags`` reads: every genre and, with
    ``titles``, each title tag at least :data:`MIN_ITEMS` of them have; sorted."""
    counts = Counter(t for item in tags for t in set(item))
    return tuple(
        sorted(t for t, n in counts.items() if not is_title_tag(t) or (titles and n >= MIN_ITEMS))
    )


def tag_rows(vocabulary: Sequence[str], tags: Sequence[Iterable[str]]) -> Tensor:
    """(M, T) each item's tags as weights summing to 1 over ``vocabulary`` (a zero row for an
    item with none of them; tags outside the vocabulary are not known to the model)."""
    column = {name: j for j, name in enumerate(vocabulary)}
    rows = torch.zeros(len(tags), len(vocabulary))
    for i, names in enumerate(tags):
        known = sorted({column[n] for n in names if n in column})
        if known:
            rows[i, known] = 1.0 / len(known)
    return rows
