"""The results page (``docs/results.md``), its JSON twin and the training plots."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.offline.attention import COMPONENT_ENTROPY, ITEM_ENTROPY
from service.offline.metrics import Interval

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
DIFF_METRICS = ("R@20", "nDCG@20", "AUC", "RR", "R@100", "nDCG@100")
ATTENTION_LINES = ((ITEM_ENTROPY, "item", "o-"), (COMPONENT_ENTROPY, "component", "s--"))


@dataclass(frozen=True)
class ModelRun:
    name: str
    config: dict[str, Any]
    seconds: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


Summary = Mapping[str, Mapping[str, Mapping[str, Interval]]]  # protocol -> model -> metric


def results_json(
    *,
    dataset: str,
    summary: Summary,
    diffs: Summary,
    runs: Sequence[ModelRun],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """``{"dataset", "protocols": {protocol: {model: {metric: mean}}}, ...}`` plus intervals."""
    return {
        "dataset": dataset,
        "protocols": {
            p: {m: {k: iv.mean for k, iv in t.items()} for m, t in models.items()}
            for p, models in summary.items()
        },
        "intervals_95": {
            p: {m: {k: [iv.low, iv.high] for k, iv in t.items()} for m, t in models.items()}
            for p, models in summary.items()
        },
        "difference_to_acf_95": {
            p: {
                m: {k: [iv.mean, iv.low, iv.high] for k, iv in t.items()} for m, t in models.items()
            }
            for p, models in diffs.items()
        },
        "runs": [
            {"model": r.name, "seconds": r.seconds, "best_epoch": r.best_epoch, "config": r.config}
            for r in runs
        ],
        **extra,
    }


def results_markdown(
    *,
    dataset: str,
    summary: Summary,
    diffs: Summary,
    runs: Sequence[ModelRun],
    defaults: Mapping[str, Any],
    notes: Sequence[str],
) -> str:
    lines = [f"# Results on `{dataset}`", "", *notes, ""]
    for protocol, models in summary.items():
        metrics = list(next(iter(models.values())))
        lines += [
            f"## Protocol `{protocol}`",
            "",
            "Mean over users [95% bootstrap interval].",
            "",
            "| model | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for name, table in models.items():
            lines.append(f"| {name} | " + " | ".join(_cell(table[k]) for k in metrics) + " |")
        if protocol == "seed":
            lines.append(
                "| *tutorial ACF, Wikimedia (reference)* | "
                + " | ".join(
                    f"*{TUTORIAL_WIKIMEDIA[k]:.5f}*" if k in TUTORIAL_WIKIMEDIA else ""
                    for k in metrics
                )
                + " |"
            )
        lines += [
            "",
            f"Difference ACF − model, paired bootstrap over users ({protocol}):",
            "",
            "| model | " + " | ".join(DIFF_METRICS) + " |",
            "|---|" + "---|" * len(DIFF_METRICS),
        ]
        for name, table in diffs[protocol].items():
            lines.append(f"| {name} | " + " | ".join(_cell(table[k]) for k in DIFF_METRICS) + " |")
        lines.append("")
    shared = ", ".join(f"{k}={v}" for k, v in defaults.items() if k != "model")
    lines += [
        "## Training runs",
        "",
        f"Defaults: {shared}. Each run lists what it changes.",
        "",
        "| model | best epoch | epochs run | wall time (s) | settings changed |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        changed = ", ".join(
            f"{k}={v}" for k, v in run.config.items() if k != "model" and v != defaults.get(k)
        )
        lines.append(
            f"| {run.name} | {run.best_epoch} | {len(run.history)} | {run.seconds:.1f} | "
            f"{changed or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _cell(iv: Interval) -> str:
    return f"{iv.mean:.5f} [{iv.low:.5f}, {iv.high:.5f}]"


def plot_history(runs: Sequence[ModelRun], path: Path) -> None:
    """Per epoch, one line per model: training loss, validation nDCG@20 and R@20, and how
    peaked the attention is (normalised entropy; 1.0, drawn as "flat", is uniform weights)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = {
        "loss": ("training loss", axes[0, 0]),
        "nDCG@20": ("validation nDCG@20", axes[0, 1]),
        "R@20": ("validation R@20", axes[1, 0]),
    }
    attention = axes[1, 1]
    for i, run in enumerate(runs):
        if not run.history:
            continue  # nothing trained (popularity)
        epochs = [h["epoch"] for h in run.history]
        for key, (_, ax) in panels.items():
            ax.plot(epochs, [h[key] for h in run.history], "o-", color=f"C{i}", label=run.name)
        for key, level, style in ATTENTION_LINES:
            if key in run.history[0]:
                values = [h[key] for h in run.history]
                attention.plot(epochs, values, style, color=f"C{i}", label=f"{run.name} {level}")
    attention.axhline(1.0, color="grey", linestyle=":", label="flat")
    attention.set_ylim(0.0, 1.05)  # 0 = all weight on one choice, 1 = uniform
    panels["attention"] = ("attention: normalised entropy (1 = flat)", attention)
    for title, ax in panels.values():
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("training curves: %s", path)
