"""The results page (``docs/results.md``), its JSON twin and the training plots."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from service.model.checkpoint import SERVED_FILE
from service.offline.evaluation.diversity import DiversityRow
from service.offline.evaluation.metrics import HEADLINE, Interval
from service.offline.experiments.cold import ColdComparison
from service.offline.experiments.cold_page import cold_json, cold_section
from service.offline.experiments.figures import interval, names, signed_interval, triples
from service.offline.experiments.results import Comparison, Contest
from service.offline.training.config import SERVING_METRIC, reads_user_key

if TYPE_CHECKING:
    from service.offline.experiments.plan import Plan

log = logging.getLogger(__name__)

# The VisRec tutorial's ACF on its Wikimedia Commons dataset (README of the tutorial), quoted for
# reference only: another dataset, so the numbers are not comparable one to one.
TUTORIAL_WIKIMEDIA: dict[str, float] = {
    "AUC": 0.80409,
    "RR": 0.01594,
    "R@20": 0.05473,
    "P@20": 0.00273,
    "nDCG@20": 0.02127,
    "R@100": 0.14935,
    "P@100": 0.00149,
    "nDCG@100": 0.03781,
}
PAGE_METRICS = ("R@20", "nDCG@20", "AUC", "RR", "R@100", "nDCG@100")


@dataclass(frozen=True)
class Report:
    main: Comparison
    synthetic: Comparison | None
    plan: Plan
    n_users: int
    n_items: int
    timings: dict[str, float]
    device: str
    jobs: int = 1  # training runs side by side (runner.Runner)
    chosen: str = ""  # where the plan's settings were chosen, in words
    served: str = ""  # the row whose checkpoint the service serves on this data
    cold: ColdComparison | None = None  # the cold-item protocol, when the plan has [cold]
    diversity: tuple[DiversityRow, ...] = ()  # the served run's re-rank on `standard`


def results_json(report: Report) -> dict[str, Any]:
    """Every figure of the page: means, intervals, spreads, differences, runs, timings."""

    def dump(c: Comparison) -> dict[str, Any]:
        return {
            "dataset": c.dataset,
            "protocols": {
                p: {m: {k: iv.mean for k, iv in t.items()} for m, t in rows.items()}
                for p, rows in c.summary.items()
            },
            "intervals_95": {
                p: {m: {k: [iv.low, iv.high] for k, iv in t.items()} for m, t in rows.items()}
                for p, rows in c.summary.items()
            },
            "spread_over_seeds": c.spread,
            "difference_to_reference_95": {p: triples(rows) for p, rows in c.diffs.items()},
            "heatmaps": {r.name: r.heatmaps for r in c.rows if r.heatmaps},
            "new_items_precision_at_20": {
                m: [iv.mean, iv.low, iv.high] for m, iv in c.new_items.items()
            },
            "tail_standard": {
                b.label: {
                    "users": b.users,
                    "rows": triples(b.summary),
                    "difference_to_reference_95": triples(b.diffs),
                }
                for b in c.tail
            },
            "new_items_difference_to_reference_95": {
                m: [iv.mean, iv.low, iv.high] for m, iv in c.new_items_diffs.items()
            },
            "runs": _runs_json(c),
            "best_acf_against_sasrec_95": _contest_json(c.contest),
        }

    return {
        **dump(report.main),
        "reference": report.plan.reference,
        "seeds": list(report.plan.seeds),
        "synthetic": dump(report.synthetic) if report.synthetic else None,
        "features": {"backbone": report.plan.backbone},
        "timings": report.timings,
        "bootstrap_seed": report.plan.bootstrap_seed,
        "device": report.device,
        "diversity_standard": [asdict(r) for r in report.diversity],
        "jobs": report.jobs,
        "settings_chosen": report.chosen,
        "served": report.served,
        "cold": cold_json(report.cold) if report.cold else None,
    }


def _contest_json(contest: Contest | None) -> dict[str, Any] | None:
    if contest is None:
        return None
    return {"acf": contest.acf, "sasrec": contest.sasrec, "difference": triples(contest.diffs)}


def _runs_json(c: Comparison) -> list[dict[str, Any]]:
    return [
        {
            "row": run.name,
            "seed": run.seed,
            "seconds": run.seconds,
            "best_epoch": run.best_epoch,
            "epochs_run": len(run.history) if run.best_epoch else 0,
            "config": run.config,
            "history": run.history,
        }
        for r in c.rows
        for run in r.runs
    ]


def results_markdown(report: Report) -> str:
    main, plan = report.main, report.plan
    ref = plan.reference
    lines = [f"# Results on `{main.dataset}`", "", *_notes(report), ""]
    lines += ["## What wins", ""]
    for protocol in ("standard", "seed"):
        lines += [f"**Protocol `{protocol}`.** " + " ".join(_verdict(main, protocol, ref)), ""]
    lines += _contest(main.contest)
    lines += _served(report)
    for protocol in ("standard", "seed"):
        lines += _protocol_section(main, protocol, ref)
    lines += _ablation_section(report)
    lines += _tail_section(main, ref)
    lines += _diversity_section(report)
    if report.cold is not None and plan.cold is not None:
        lines += cold_section(report.cold, plan.cold)
    lines += _heatmap_section(report)
    lines += _runs_section(report)
    return "\n".join(lines) + "\n"


def _fitted(plan: Plan) -> str:
    if plan.adapt is None:
        return ""
    return (
        f", its last stage fitted to the items' {plan.adapt} first "
        "(`service/offline/data/adapt.py`; the cold-item protocol's to the warm items' only)"
    )


def _aged(plan: Plan) -> str:
    aged = [f"`{row.name}`" for row in plan.rows if row.config.ages]
    if not aged:
        return ""
    return (
        f" {', '.join(aged)} also read{'s' if len(aged) == 1 else ''} how long before the "
        "profile's newest item each one came; every other row reads the profile's order only."
    )


def _notes(report: Report) -> list[str]:
    plan, t = report.plan, report.timings
    seeds = ", ".join(map(str, plan.seeds))
    return [
        f"{report.n_users} users, {report.n_items} items; leave-last-out split (last interaction "
        "= test, the one before = validation). Every model is ranked over the whole catalogue; "
        f"ties count against the model. Backbone: `{plan.backbone}`{_fitted(plan)}.",
        "",
        "`standard` gives the last 9 training items as the profile and removes all training and "
        "validation items from the ranking; `seed` is the VisRec tutorial's protocol (profile = "
        "last 10 training items, only those removed, AUC over the whole catalogue). As before, "
        "the validation item is not part of the `standard` profile, so figures compare with "
        "earlier pages. Models with per-user state (ACF's and BPR-MF's user embeddings, EASE's "
        "row of all training items) see more than the profile; SASRec and the transition "
        "counter see the profile alone. An ACF row with user embeddings reads them under a "
        "protocol only where that protocol's validation ranked better with them than from the "
        f"profile alone (each run's choice: `user vector read` under Training runs).{_aged(plan)}",
        "",
        f"Every row is trained with seeds {seeds}; the fitted baselines (popularity, "
        "transitions, EASE) have no randomness and are fitted once. A figure is the mean over "
        "seeds of the mean over users, ± the standard deviation over seeds, [the 95% bootstrap "
        f"interval over users of their metric averaged over seeds] ({plan.n_resamples} "
        f"resamples, seed {plan.bootstrap_seed}). Differences pair the same users. "
        f"{report.chosen}",
        "",
        f"Wall times on `{report.device}`"
        + (f", {report.jobs} training runs side by side" if report.jobs > 1 else "")
        + f" (Training runs: each its own): features "
        f"{t['features_s']:.0f} s, training and evaluation "
        f"{t['training_and_evaluation_s']:.0f} s, cold-item protocol "
        f"{t.get('cold_s', 0.0):.0f} s, synthetic world "
        f"{t['synthetic_s']:.0f} s, whole run {t['total_s']:.0f} s "
        f"({t['total_s'] / 60:.1f} min). Training curves (first seed): `training.png`.",
    ]


def _served(report: Report) -> list[str]:
    """Which row the service serves on this data, and why."""
    if not report.served:
        return []
    rows = {r.name: r for r in report.main.rows}
    chosen, ref = rows[report.served], rows.get(report.plan.reference)
    against = f" against {ref.validation:.4f} for `{ref.name}`" if ref and ref is not chosen else ""
    return [
        f"**Served.** `{chosen.name}`: of the rows the service can serve (ACF's and SASRec), "
        f"the best on `standard` validation, the protocol that serving is ({SERVING_METRIC} "
        f"{chosen.validation:.4f} over seeds"
        f"{against}). Its best seed's checkpoint is `{SERVED_FILE}` in the run folder, which "
        "`visrec-serve` (`make serve DATA=...`) serves.",
        "",
    ]


def _contest(contest: Contest | None) -> list[str]:
    """The page's goal: the best ACF variant ahead of SASRec, both metrics, both protocols."""
    if contest is None:
        return []
    figures = "; ".join(
        f"`{p}` " + ", ".join(f"{k} {signed_interval(diffs[k])}" for k in HEADLINE)
        for p, diffs in contest.diffs.items()
    )
    ahead = all(d[k].low > 0 for d in contest.diffs.values() for k in HEADLINE)
    return [
        f"**Best ACF variant against SASRec.** `{contest.acf}` (of the ACF rows, the best on "
        f"`standard` validation) − `{contest.sasrec}`, paired over users: {figures}. "
        + (
            "Ahead on both metrics under both protocols (every interval above zero)."
            if ahead
            else "Not ahead on both metrics under both protocols (an interval reaches zero "
            "or below): the goal of ACF ahead of SASRec is not met on this data."
        ),
        "",
    ]


def _verdict(c: Comparison, protocol: str, ref: str) -> list[str]:
    """Sentences: who the reference beats, matches and loses to on the headline metrics."""
    ahead, level, behind = [], [], []
    for name, diffs in c.diffs[protocol].items():
        ivs = [diffs[k] for k in HEADLINE]
        if all(iv.low > 0 for iv in ivs):
            ahead.append(name)
        elif any(iv.high < 0 for iv in ivs):
            behind.append(name)
        else:
            level.append(name)
    out = []
    if ahead:
        out.append(
            f"`{ref}` is ahead of {names(ahead)} on both R@20 and nDCG@20, with the 95% "
            "paired interval of the difference above zero."
        )
    if level:
        out.append(
            f"`{ref}` cannot be told apart from {names(level)} on at least one of them (the "
            "interval includes zero)."
        )
    if behind:
        details = "; ".join(
            f"`{n}` by "
            + ", ".join(
                f"{-c.diffs[protocol][n][k].mean:.4f} {k}"
                for k in HEADLINE
                if c.diffs[protocol][n][k].high < 0
            )
            for n in behind
        )
        out.append(f"`{ref}` loses to {names(behind)}: {details}.")
    best = max(c.summary[protocol], key=lambda n: c.summary[protocol][n]["nDCG@20"].mean)
    out.append(f"Highest mean nDCG@20: `{best}`.")
    return out


def _protocol_section(c: Comparison, protocol: str, ref: str) -> list[str]:
    lines = [
        f"## Protocol `{protocol}`",
        "",
        "Mean over seeds ± sd over seeds [95% bootstrap interval over users].",
        "",
        "| row | " + " | ".join(PAGE_METRICS) + " |",
        "|---|" + "---|" * len(PAGE_METRICS),
    ]
    for name, table in c.summary[protocol].items():
        spread = c.spread[protocol][name]
        cells = [_cell(table[k], spread[k]) for k in PAGE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if protocol == "seed":
        lines.append(
            "| *tutorial ACF, Wikimedia (reference)* | "
            + " | ".join(f"*{TUTORIAL_WIKIMEDIA[k]:.5f}*" for k in PAGE_METRICS)
            + " |"
        )
    lines += [
        "",
        f"Difference `{ref}` − row, paired bootstrap over users ({protocol}):",
        "",
        "| row | " + " | ".join(PAGE_METRICS) + " |",
        "|---|" + "---|" * len(PAGE_METRICS),
    ]
    for name, table in c.diffs[protocol].items():
        row = " | ".join(signed_interval(table[k]) for k in PAGE_METRICS)
        lines.append(f"| {name} | {row} |")
    return [*lines, ""]


def _world_lines(report: Report) -> list[str]:
    if report.plan.synthetic is None:
        return []
    w = report.plan.synthetic.spec
    kinds = f"{w.kinds} shapes" + (f" x {w.colours} colours" if w.colours else "")
    lines = [
        f"The synthetic world (`service/offline/data/synthetic.py`, seed {w.seed}): "
        f"{w.n_users} users with {w.interactions_per_user} interactions each, in runs of one "
        f"kind (mean length {w.run_length:g}; the favourite kind's with probability "
        f"{w.taste:g}), over {w.n_items} items of {kinds}, {w.clutter} distractor shapes of "
        f"other kinds per image ({w.clutter_min:.2g}-{w.clutter_max:.2g} times the object's "
        "side, drawn under it)."
    ]
    if w.new_per_kind:
        lines.append(
            f"New items: {w.new_per_kind} more images of each kind that no row was trained on, "
            "added after training as `POST /items` adds them. A test user's precision@20 "
            "among them is the share of the first 20 that are of their held-out item's kind "
            f"(chance {1 / w.classes:.3f}); `cannot`: the row cannot score items from images."
        )
    return [" ".join(lines), ""]


def _ablation_section(report: Report) -> list[str]:
    """The ACF rows side by side on the real data and the synthetic world (standard), with
    the new items of the synthetic world where it has them."""
    comparisons = _comparisons(report)
    acf_rows = [r.name for r in report.main.rows if r.runs[0].config.get("model") == "acf"]
    ref = report.plan.reference
    columns = [f"{c.dataset} {k} | {c.dataset} Δ {k}" for c in comparisons for k in HEADLINE]
    columns += [f"{c.dataset} new items P@20 | Δ" for c in comparisons if c.new_items]
    lines = [
        "## The visual half: ablations (protocol `standard`)",
        "",
        f"Each ACF row, and `{ref}` − row paired over users (Δ). `acf_mean_pool` averages the 49 "
        "components instead of attending to them; `acf_no_visual` uses no image at all; "
        "`acf_tutorial` is the VisRec tutorial's ACF, in which the image only re-weights the "
        "profile items.",
        "",
        *_world_lines(report),
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---|---|" * len(columns),
    ]
    for name in acf_rows:
        cells = []
        for c in comparisons:
            for k in HEADLINE:
                if name not in c.summary["standard"]:
                    cells += ["", ""]
                    continue
                cells.append(f"{c.summary['standard'][name][k].mean:.4f}")
                diff = c.diffs["standard"].get(name)
                cells.append(signed_interval(diff[k]) if diff else "—")
        for c in comparisons:
            if c.new_items and name not in c.summary["standard"]:
                cells += ["", ""]
            elif c.new_items:
                ranked, change = c.new_items.get(name), c.new_items_diffs.get(name)
                cells.append(f"{ranked.mean:.4f}" if ranked else "cannot")
                cells.append(signed_interval(change) if change else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _diversity_section(report: Report) -> list[str]:
    if not report.diversity:
        return []
    lines = [
        "## Diversity (protocol `standard`)",
        "",
        f"`/recommend?diversity=...` on the served run (`{report.served}`, its best seed): each "
        "test user's top 20 re-ranked from the best-scored pool as the service does it "
        "(`service/diversity.py`); ILS@20 is the mean cosine between the 20 items' vectors.",
        "",
        "| diversity | R@20 | nDCG@20 | nDCG@20 − at 0 [95%] | ILS@20 |",
        "|---|---|---|---|---|",
    ]
    for r in report.diversity:
        lines.append(
            f"| {r.diversity:.2f} | {r.recall:.4f} | {r.ndcg:.4f} | "
            f"{signed_interval(r.ndcg_change)} | {r.ils:.3f} |"
        )
    return [*lines, ""]


def _tail_section(c: Comparison, ref: str) -> list[str]:
    """`standard` by how many training interactions the target item had (the long tail)."""
    if not c.tail:
        return []
    columns = [f"{b.label} ({b.users} users) {k} | Δ" for b in c.tail for k in HEADLINE]
    lines = [
        "## The long tail (protocol `standard`)",
        "",
        "Test users bucketed by their target item's training interactions; each row's mean over "
        f"seeds [95% interval], and `{ref}` − row paired over the bucket's users (Δ).",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---|---|" * len(columns),
    ]
    for name in c.summary["standard"]:
        cells = []
        for b in c.tail:
            for k in HEADLINE:
                cells.append(interval(b.summary[name][k]))
                diff = b.diffs.get(name)
                cells.append(signed_interval(diff[k]) if diff else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _heatmap_section(report: Report) -> list[str]:
    lines = [
        "## Where the component attention looks",
        "",
        "Over the standard protocol's profiles (every real profile item of every test user), "
        "mean over seeds: normalised entropy of the 7x7 heatmap (1 = flat), where its strongest "
        "cell lies against the share of such cells (chance), and the median largest item "
        "weight of profiles of two or more items. In the synthetic world the object's cells "
        "(covered at least a quarter by the object) are known: the attention mass on them "
        "against their share of the grid, and how often the strongest cell is on them; and the "
        "mass on them of the weights each item's own image vector (what it is scored by as a "
        "candidate) pools its cells with: the component attention of a user the model knows "
        "nothing of, or the mean.",
        "",
        "| data | row | entropy | strongest on border (chance) | strongest in a corner (chance)"
        " | top item weight (median) | mass on object (area) | strongest on object"
        " | items' own image: mass on object |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in _comparisons(report):
        for row in c.rows:
            if not row.heatmaps:
                continue
            h = {k: sum(s[k] for s in row.heatmaps) / len(row.heatmaps) for k in row.heatmaps[0]}
            obj = (
                (
                    f"{h['object_mass']:.3f} ({h['object_area']:.3f})",
                    f"{h['strongest_on_object']:.3f}",
                    f"{h['image_object_mass']:.3f}" if "image_object_mass" in h else "",
                )
                if "object_mass" in h
                else ("", "", "")
            )
            lines.append(
                f"| {c.dataset} | {row.name} | {h['component_entropy']:.3f} | "
                f"{h['strongest_on_border']:.3f} ({h['border_chance']:.3f}) | "
                f"{h['strongest_in_corner']:.3f} ({h['corner_chance']:.3f}) | "
                f"{h['item_top_weight_median']:.3f} | {obj[0]} | {obj[1]} | {obj[2]} |"
            )
    return [*lines, ""]


def _runs_section(report: Report) -> list[str]:
    from service.offline.training.config import TrainConfig

    defaults = TrainConfig().__dict__
    lines = [
        "## Training runs",
        "",
        "Settings are shown where they differ from `TrainConfig`'s defaults: "
        + ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in ("model", "seed"))
        + ".",
        "",
        "`user vector read`: for an ACF with user embeddings, whether each protocol scores with "
        "them, as that protocol's validation chose (`standard`, `seed`).",
        "",
        "| data | row | seed | best epoch | epochs run | wall time (s) | user vector read | "
        "settings changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in _comparisons(report):
        for row in c.rows:
            for run in row.runs:
                changed = ", ".join(
                    f"{k}={v}"
                    for k, v in run.config.items()
                    if k != "seed" and v != defaults.get(k)
                )
                epochs = len(run.history) if run.best_epoch else 0
                best = f"{run.best_epoch}"
                if run.best_epoch and run.best_epoch == epochs == run.config.get("epochs"):
                    best += " (still improving at its last epoch)"
                lines.append(
                    f"| {c.dataset} | {row.name} | {run.seed} | {best} | {epochs} | "
                    f"{run.seconds:.1f} | {_user_read(run.validation)} | {changed or '-'} |"
                )
    return [*lines, ""]


def _user_read(validation: dict[str, float]) -> str:
    """Per protocol, whether the run's validation chose to read the user embeddings."""
    read = [validation.get(reads_user_key(p)) for p in ("standard", "seed")]
    return ", ".join("-" if r is None else "yes" if r else "no" for r in read)


def _comparisons(report: Report) -> list[Comparison]:
    return [c for c in (report.main, report.synthetic) if c is not None]


def _cell(iv: Interval, sd: float) -> str:
    return f"{iv.mean:.4f} ± {sd:.4f} [{iv.low:.4f}, {iv.high:.4f}]"
