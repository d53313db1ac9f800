"""Training curves of a run's models (``training.png`` beside the results page)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from service.offline.evaluation.attention import (
    COMPONENT_ENTROPY,
    IN_CORNER,
    ITEM_ENTROPY,
    ON_BORDER,
    grid_regions,
)
from service.offline.experiments.results import ModelRun

log = logging.getLogger(__name__)
ATTENTION_LINES = ((ITEM_ENTROPY, "item", "o-"), (COMPONENT_ENTROPY, "component", "s--"))


def plot_history(runs: Sequence[ModelRun], path: Path) -> None:
    """Per epoch, one line per model: training loss, validation nDCG@20 under both protocols
    (their mean chooses the kept epoch), and how
    peaked the attention is (normalised entropy; 1.0, drawn as "flat", is uniform weights)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(18, 8))
    panels = {
        "loss": ("training loss", axes[0, 0]),
        "nDCG@20": ("validation nDCG@20, standard", axes[0, 1]),
        "seed nDCG@20": ("validation nDCG@20, seed", axes[0, 2]),
    }
    attention, where = axes[1, 0], axes[1, 1]
    axes[1, 2].axis("off")
    for i, run in enumerate(runs):
        if not run.best_epoch:
            continue  # nothing trained (a fitted baseline)
        epochs = [h["epoch"] for h in run.history]
        for key, (_, ax) in panels.items():
            values = [h.get(key, float("nan")) for h in run.history]  # older runs: no seed
            ax.plot(epochs, values, "o-", color=f"C{i}", label=run.name)
        for key, level, style in ATTENTION_LINES:
            if key in run.history[0]:
                values = [h[key] for h in run.history]
                attention.plot(epochs, values, style, color=f"C{i}", label=f"{run.name} {level}")
        for key, region, style in ((ON_BORDER, "border", "o-"), (IN_CORNER, "corner", "s--")):
            if key in run.history[0]:
                values = [h[key] for h in run.history]
                where.plot(epochs, values, style, color=f"C{i}", label=f"{run.name} {region}")
    attention.axhline(1.0, color="grey", linestyle=":", label="flat")
    attention.set_ylim(0.0, 1.05)  # 0 = all weight on one choice, 1 = uniform
    panels["attention"] = ("attention: normalised entropy (1 = flat)", attention)
    border, corner = grid_regions(49)  # the 7x7 grid: chance is the share of such cells
    where.axhline(border.mean(), color="grey", linestyle=":", label="border by chance")
    where.axhline(corner.mean(), color="grey", linestyle="-.", label="corner by chance")
    where.set_ylim(0.0, 1.05)
    panels["where"] = ("strongest cell of the heatmaps: on the border, in a corner", where)
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
