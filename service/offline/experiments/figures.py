"""How the results pages write a figure: intervals, signed differences, lists of rows."""

from __future__ import annotations

from collections.abc import Sequence

from service.offline.evaluation.metrics import Interval


def triples(rows: dict[str, dict[str, Interval]]) -> dict[str, dict[str, list[float]]]:
    """row -> metric -> [mean, low, high]"""
    return {m: {k: [iv.mean, iv.low, iv.high] for k, iv in t.items()} for m, t in rows.items()}


def names(rows: Sequence[str]) -> str:
    """`a`, `b` and `c`"""
    quoted = [f"`{n}`" for n in rows]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def interval(iv: Interval) -> str:
    return f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]"


def signed_interval(iv: Interval) -> str:
    return f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"
