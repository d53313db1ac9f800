"""The results page (``docs/results.md``), its JSON twin and the training plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.offline.metrics import Interval

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
    """Training loss and validation nDCG@20 / R@20 per epoch, one line per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        if not run.history:
            continue
        epochs = [h["epoch"] for h in run.history]
        for ax, key in zip(axes, ("loss", "nDCG@20", "R@20"), strict=True):
            ax.plot(epochs, [h[key] for h in run.history], marker="o", label=run.name)
    for ax, title in zip(
        axes, ("training loss", "validation nDCG@20", "validation R@20"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
