"""Reading an experiment's feedback: click-through rate per arm with its interval, each arm
against the control, and a plain verdict (:func:`report`). Pure arithmetic on counts, so
``visrec experiment report`` and tests share it."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from service.registry import Experiment
from service.store.feedback import RedisFeedback, Totals

Z_95 = 1.959964  # the rates' intervals
Z_VERDICT = 2.575829  # 99%: a winner is named only when the difference's 99% interval excludes 0
Z_POWER = 0.841621  # 80% power, for "how many more impressions"


def wilson(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for the default z): unlike the normal
    approximation it stays inside [0, 1] and is sound for rates near 0, as CTRs are."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    half = spread / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference(arm: Totals, control: Totals, z: float = Z_VERDICT) -> tuple[float, float, float]:
    """CTR(arm) - CTR(control) and its interval (Newcombe's hybrid score interval, from the
    two Wilson intervals)."""
    p1, p0 = arm.clicks / arm.impressions, control.clicks / control.impressions
    l1, u1 = wilson(arm.clicks, arm.impressions, z)
    l0, u0 = wilson(control.clicks, control.impressions, z)
    d = p1 - p0
    return d, d - math.hypot(p1 - l1, u0 - p0), d + math.hypot(u1 - p1, p0 - l0)


@dataclass(frozen=True)
class Verdict:
    arm: str
    control: str
    difference: tuple[float, float, float]  # CTR(arm) - CTR(control), 99% interval
    winner: str | None  # the arm ahead with the interval clear of zero; None: cannot tell
    more_impressions: int | None  # about how many more (all arms) to tell a difference this size

    def __str__(self) -> str:
        d, low, high = self.difference
        figures = f"{d:+.4f} [{low:+.4f}, {high:+.4f}] (99%)"
        if self.winner is not None:
            loser = self.control if self.winner == self.arm else self.arm
            ahead = f"{self.winner} ahead of {loser} by {abs(d):.4f} CTR"
            return f"{ahead}: {self.arm} − {self.control} {figures}"
        more = (
            f"about {self.more_impressions:,} more impressions needed"
            if self.more_impressions is not None
            else "no difference seen"
        )
        return f"{self.arm} − {self.control}: {figures}; cannot tell yet: {more}"


def verdicts(experiment: Experiment, counts: Mapping[str, Totals]) -> list[Verdict]:
    """Each arm against the control (the first), by their counts (arm name -> totals)."""
    control = experiment.arms[0][0]
    shares = dict(zip((a for a, _ in experiment.arms), experiment.split, strict=True))
    out = []
    for arm, _ in experiment.arms[1:]:
        a, c = counts.get(arm, Totals()), counts.get(control, Totals())
        if not a.impressions or not c.impressions:
            out.append(Verdict(arm, control, (0.0, -1.0, 1.0), None, None))
            continue
        d, low, high = difference(a, c)
        winner = arm if low > 0 else control if high < 0 else None
        more = None if winner or d == 0 else _more(a, c, d, shares[arm], shares[control])
        out.append(Verdict(arm, control, (d, low, high), winner, more))
    return out


def _more(arm: Totals, control: Totals, d: float, share: int, control_share: int) -> int:
    """Impressions still to come (all arms, at the experiment's split) before a difference
    of ``d`` would be told apart with 80% power at the verdict's 99% level."""
    p1, p0 = arm.clicks / arm.impressions, control.clicks / control.impressions
    per_arm = (Z_VERDICT + Z_POWER) ** 2 * (p1 * (1 - p1) + p0 * (1 - p0)) / (d * d)
    total_now = (arm.impressions + control.impressions) * 100 / (share + control_share)
    total_needed = per_arm * 100 / min(share, control_share)
    return max(0, math.ceil(total_needed - total_now))


def arm_counts(
    experiment: Experiment, totals: Mapping[tuple[str, str], Totals]
) -> dict[str, Totals]:
    """The experiment's counts by arm name, out of every (version, arm label)'s."""
    prefix = experiment.label("")
    return {arm.removeprefix(prefix): t for (_, arm), t in totals.items() if arm.startswith(prefix)}


def stored_totals(redis_url: str, prefix: str) -> dict[tuple[str, str], Totals]:
    """Every process's feedback counts, as the feedback store in Redis holds them."""

    async def read() -> dict[tuple[str, str], Totals]:
        feedback = RedisFeedback.from_url(redis_url, prefix=prefix, window_s=3600, deadline_s=5.0)
        try:
            return await feedback.totals()
        finally:
            await feedback.close()

    return asyncio.run(read())


def report(experiment: Experiment, totals: Mapping[tuple[str, str], Totals]) -> list[str]:
    """The lines ``visrec experiment report`` prints: each arm's counts, then the verdicts."""
    counts = arm_counts(experiment, totals)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(experiment.started))
    arms = ", ".join(
        f"{a}={v} ({s}%)" for (a, v), s in zip(experiment.arms, experiment.split, strict=True)
    )
    lines = [f"experiment {experiment.id}, started {started}: {arms}", ""]
    lines.append(f"{'arm':<12} {'impressions':>12} {'clicks':>9} {'CTR':>7}  95% interval")
    for arm, _ in experiment.arms:
        t = counts.get(arm, Totals())
        if t.impressions:
            low, high = wilson(t.clicks, t.impressions)
            rate = f"{t.clicks / t.impressions:>7.4f}  [{low:.4f}, {high:.4f}]"
        else:
            rate = f"{'—':>7}"
        lines.append(f"{arm:<12} {t.impressions:>12,} {t.clicks:>9,} {rate}")
    return [*lines, "", *map(str, verdicts(experiment, counts))]
