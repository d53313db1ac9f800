"""The training plot and the attention statistics it shows, on hand-built cases."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.model.acf import ACF, PAD, ACFConfig
from service.offline.evaluation.attention import (
    COMPONENT_ENTROPY,
    COMPONENT_MAX,
    IN_CORNER,
    ITEM_ENTROPY,
    ITEM_MAX,
    ON_BORDER,
    Probe,
    attention_stats,
    flat_levels,
    peakedness,
    strongest_cells,
)
from service.offline.experiments.plots import plot_history
from service.offline.experiments.results import ModelRun

N_USERS, N_ITEMS, K, C = 5, 12, 49, 16
CONFIG = ACFConfig(n_users=N_USERS, n_items=N_ITEMS, feature_dim=C, dim=8, attention_dim=6)
# Rows: 3 real items, 1 real item (no choice: left out of the item level), 4 real items.
PROBE = Probe(
    users=torch.tensor([0, 3, 4]),
    profiles=torch.tensor([[3, 5, PAD, 7, PAD], [2, PAD, PAD, PAD, PAD], [1, 4, 6, 8, PAD]]),
)
T, F = True, False


def _acf(config: ACFConfig = CONFIG, *, attention_scale: float = 1.0) -> ACF:
    """A random ACF whose attention logits are multiplied by ``attention_scale`` (0: flat)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ACF(config, torch.randn(N_ITEMS, K, C, generator=g)).eval()
    with torch.no_grad():
        for layer in (model.item_out, model.comp_out):
            layer.bias.add_(0.1)  # non-zero, so that scaling it to 0 is a real change
            layer.weight.mul_(attention_scale)
            layer.bias.mul_(attention_scale)
    return model


def test_uniform_is_one_and_one_hot_is_zero() -> None:
    support = torch.tensor([[T, T, T, F, F]])
    assert peakedness(torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0]]), support) == pytest.approx(
        (1.0, 1 / 3)
    )
    assert peakedness(torch.tensor([[0.0, 1.0, 0.0, 0, 0]]), support) == pytest.approx((0.0, 1.0))
    # Half on each of two of four choices: log 2 / log 4.
    half = peakedness(torch.tensor([[0.5, 0.5, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert half == pytest.approx((0.5, 0.5))


def test_padding_is_not_a_choice() -> None:
    # Uniform over the 3 real items of 5 slots is flat (log 3 / log 3, not log 3 / log 5), and a
    # row with a single real item is left out rather than counted as one-hot (or 0 / 0).
    weights = torch.tensor([[0.0, 1 / 3, 1 / 3, 0.0, 1 / 3], [1.0, 0.0, 0.0, 0.0, 0.0]])
    support = torch.tensor([[F, T, T, F, T], [T, F, F, F, F]])
    assert peakedness(weights, support) == pytest.approx((1.0, 1 / 3))
    assert all(math.isnan(v) for v in peakedness(weights[1:], support[1:]))


def test_zero_attention_weights_give_flat_statistics() -> None:
    stats = attention_stats(_acf(attention_scale=0.0), PROBE)
    levels = (ITEM_ENTROPY, ITEM_MAX, COMPONENT_ENTROPY, COMPONENT_MAX)
    assert {k: stats[k] for k in levels} == pytest.approx(
        {
            ITEM_ENTROPY: 1.0,
            ITEM_MAX: (1 / 3 + 1 / 4) / 2,  # the 1-item row is left out
            COMPONENT_ENTROPY: 1.0,
            COMPONENT_MAX: 1 / K,
        }
    )
    assert flat_levels(stats) == ["item", "component"]


def test_statistics_match_a_slow_reference() -> None:
    model = _acf(attention_scale=5.0)
    with torch.no_grad():  # the full catalogue's tables, not the probe's items only
        attended = model.attend(PROBE.users, PROBE.profiles, model.catalogue_tables())
    item_rows, component_rows, edges = [], [], []
    for b, profile in enumerate(PROBE.profiles.tolist()):
        real = [slot for slot, item in enumerate(profile) if item != PAD]
        alpha = attended.item_attention[b, real].double().numpy()
        if len(real) > 1:
            item_rows.append((-(alpha * np.log(alpha)).sum() / np.log(len(real)), alpha.max()))
        for slot in real:
            beta = attended.component_attention[b, slot].double().numpy()
            component_rows.append((-(beta * np.log(beta)).sum() / np.log(K), beta.max()))
            r, c = divmod(int(beta.argmax()), 7)
            edges.append((r in (0, 6) or c in (0, 6), r in (0, 6) and c in (0, 6)))
    stats = attention_stats(model, PROBE)
    assert [stats[ON_BORDER], stats[IN_CORNER]] == pytest.approx(np.mean(edges, axis=0))
    assert [stats[ITEM_ENTROPY], stats[ITEM_MAX]] == pytest.approx(np.mean(item_rows, axis=0))
    assert [stats[COMPONENT_ENTROPY], stats[COMPONENT_MAX]] == pytest.approx(
        np.mean(component_rows, axis=0)
    )
    assert stats[ITEM_ENTROPY] < 0.9 and stats[COMPONENT_ENTROPY] < 0.9  # peaked, not flat
    assert flat_levels(stats) == []


def test_strongest_cells_are_counted_against_the_grid() -> None:
    # cell 0 is a corner (and on the border), 3 on the top border, 24 the centre
    stats = strongest_cells(np.array([0, 3, 24, 24]), 49)
    assert (stats[ON_BORDER], stats[IN_CORNER]) == (0.5, 0.25)
    assert stats["border_chance"] == pytest.approx(24 / 49)
    assert stats["corner_chance"] == pytest.approx(4 / 49)


def test_the_mean_pool_ablation_has_no_component_attention_to_judge() -> None:
    stats = attention_stats(_acf(replace(CONFIG, component_pool="mean")), PROBE)
    assert set(stats) == {ITEM_ENTROPY, ITEM_MAX}


def test_only_levels_above_the_threshold_are_flat() -> None:
    assert flat_levels({ITEM_ENTROPY: 0.99, COMPONENT_ENTROPY: 0.5}) == ["item"]
    assert flat_levels({ITEM_ENTROPY: 0.97, COMPONENT_ENTROPY: 0.981}) == ["component"]
    assert flat_levels({ITEM_ENTROPY: math.nan}) == []
    assert flat_levels({ITEM_ENTROPY: 0.9}, threshold=0.8) == ["item"]


def _history(epochs: int, *, attention: bool) -> list[dict[str, float]]:
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": float(e),
            "loss": 1 / e,
            "seconds": 1.0,
            "nDCG@20": 0.02 * e,
            "R@20": 0.05 * e,
        }
        if attention:
            row |= {ITEM_ENTROPY: 1 - 0.05 * e, COMPONENT_ENTROPY: 0.99, ITEM_MAX: 0.3}
            row |= {ON_BORDER: 0.9 - 0.1 * e, IN_CORNER: 0.5 - 0.08 * e}
        rows.append(row)
    return rows


def test_the_plot_is_a_readable_png(tmp_path: Path) -> None:
    runs = [
        ModelRun("acf", {}, 1.0, 4, _history(5, attention=True)),
        ModelRun("popularity", {}, 0.0, 0, []),  # nothing trained: no lines, no crash
        ModelRun("bpr_mf", {}, 1.0, 3, _history(3, attention=False)),
    ]
    path = tmp_path / "deeper" / "training.png"
    plot_history(runs, path)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1800, 800)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # lines and text, not a blank canvas
    assert 20_000 < path.stat().st_size < 1_000_000
