"""The cold-item protocol's part of the results page and of its JSON twin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.offline.evaluation.metrics import HEADLINE
from service.offline.experiments.cold import RANKINGS, ColdComparison
from service.offline.experiments.figures import interval, names, signed_interval, triples

if TYPE_CHECKING:
    from service.offline.experiments.plan import ColdPlan


def cold_json(c: ColdComparison) -> dict[str, Any]:
    return {
        "reference": c.reference,
        "test_users": c.test_users,
        "test_items": c.test_items,
        "warm_items": c.warm_items,
        "target_share": c.target_share,
        "seconds": c.seconds,
        "rankings": {ranking: triples(rows) for ranking, rows in c.summary.items()},
        "difference_to_reference_95": {ranking: triples(rows) for ranking, rows in c.diffs.items()},
        "rows": {
            r.name: {"exposure": r.exposure, "validation_ndcg20": r.validation, "s": r.seconds}
            for r in c.rows
        },
    }


def cold_section(c: ColdComparison, cold: ColdPlan) -> list[str]:
    """The cold-item protocol: new items known only by their poster."""
    ref = c.reference
    lines = [
        "## New items known only by their poster (cold-item protocol)",
        "",
        f"{cold.share:.0%} of the items with interactions are held out (drawn with seed "
        f"{cold.seed}), half for validation and half for test ({c.test_items} items); every "
        f"row is trained on the other {c.warm_items}, with seeds {_seeds(c)}. The "
        f"{c.test_users} users who chose "
        "held-out test items have all of them as targets and their last 9 warm items as "
        "profile. A trained row gets the held-out items after training through "
        "`ServingModel.with_items`, the code `POST /items` runs, so these are the scores a user "
        "of the API gets. Rankings: **cold**, the held-out test items among themselves; "
        "**all**, the warm catalogue with them added (a user's warm items removed), what the "
        "service shows; **warm**, `standard` on the warm items, what the cold gain costs. "
        "**Exposure**: held-out items' share of users' top 20 in the *all* ranking over their "
        f"share of the targets ({c.target_share:.1%}); below 0.5x buries them, above 2x "
        "floods the lists. **Validation**: the cold ranking's nDCG@20 on the validation half, "
        "where settings are chosen. Baselines rank the cold items only: random; genres only "
        "(the share of the profile with each of a candidate's genres); title and genres "
        "(TF-IDF of their words, cosine with the profile's mean); image only (cosine of "
        "the candidate's mean image feature with the profile's); the metadata rows' ties are "
        "broken at random. Mean over seeds [95% bootstrap interval over users].",
        "",
        "| row | cold R@20 | cold nDCG@20 | all R@20 | all nDCG@20 | exposure | warm R@20 "
        "| warm nDCG@20 | validation nDCG@20 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c.rows:
        cells = [
            interval(c.summary[k][r.name][m]) if r.name in c.summary[k] else "—"
            for k in RANKINGS
            for m in HEADLINE
        ]
        exposure = f"{r.mean_exposure:.2f}x" if r.exposure else "—"
        cells.insert(4, exposure)
        validation = f"{sum(r.validation) / len(r.validation):.4f}"
        lines.append(f"| `{r.name}` | " + " | ".join(cells) + f" | {validation} |")
    lines += [
        "",
        f"`{ref}` − row, paired over the same users:",
        "",
        "| row | " + " | ".join(f"{k} {m}" for k in RANKINGS for m in HEADLINE) + " |",
        "|---|" + "---|" * 6,
    ]
    for r in c.rows:
        if r.name == ref:
            continue
        cells = [
            signed_interval(c.diffs[k][r.name][m]) if r.name in c.diffs[k] else "—"
            for k in RANKINGS
            for m in HEADLINE
        ]
        lines.append(f"| `{r.name}` | " + " | ".join(cells) + " |")
    return [*lines, "", *_cold_verdict(c), ""]


def _seeds(c: ColdComparison) -> str:
    return ", ".join(map(str, c.seeds))


def _cold_verdict(c: ColdComparison) -> list[str]:
    """The issue's goals for new items, met or not, in words."""
    ref, cold = c.reference, c.diffs["cold"]
    baselines = [n for n in cold if n not in c.summary["all"]]
    won = [n for n in baselines if all(cold[n][m].low > 0 for m in HEADLINE)]
    lost = [n for n in baselines if n not in won]
    out = []
    if won:
        out.append(
            f"Cold only: `{ref}` ranks the new items better than {names(won)} on both R@20 "
            "and nDCG@20 (paired interval above zero)."
        )
    if lost:
        out.append(
            f"Cold only: **`{ref}` is not ahead of {names(lost)}** with the interval above "
            "zero on both metrics."
        )
    exposure = next(r for r in c.rows if r.name == ref).mean_exposure
    verdict = "buries them" if exposure < 0.5 else "floods the lists" if exposure > 2 else ""
    out.append(
        f"All: `{ref}` shows the new items {exposure:.2f}x as often as users chose them: "
        + (f"it **{verdict}**" if verdict else "neither buried nor flooding")
        + " (goal 0.5x–2x)."
    )
    for r in c.rows:
        if r.name == ref or r.name not in c.summary["all"]:
            continue
        iv, warm = cold[r.name]["nDCG@20"], c.diffs["warm"][r.name]
        out.append(
            f"`{ref}` − `{r.name}`: cold-only nDCG@20 {signed_interval(iv)}; warm "
            f"{warm['nDCG@20'].mean:+.4f} nDCG@20, {warm['R@20'].mean:+.4f} R@20 (goal for "
            f"warm items: no worse than −0.005); `{r.name}` shows new items "
            f"{r.mean_exposure:.2f}x."
        )
    return [" ".join(out)]
