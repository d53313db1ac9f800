"""How peaked ACF's attention is, measured after every epoch.

Flat attention (every weight 1/n, so the profile is averaged rather than attended) is this
model's known failure without regularisation, and the loss does not show it. The statistics are
the normalised entropy (entropy / log n over the n real choices: 1.0 = uniform, 0.0 = one-hot)
and the mean largest weight, for the item level (over the non-PAD profile items) and the
component level (over the K components of each real profile item).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from service.model.acf import ACF, PAD
from service.offline.evaluation.evaluate import Task

PROBE_USERS = 256  # enough for means to two decimals; a fraction of one validation pass
FLAT = 0.98  # normalised entropy above this counts as flat
ITEM_ENTROPY = "item_attention_entropy"
ITEM_MAX = "item_attention_max"
COMPONENT_ENTROPY = "component_attention_entropy"
COMPONENT_MAX = "component_attention_max"
LEVELS = {"item": ITEM_ENTROPY, "component": COMPONENT_ENTROPY}
ON_BORDER = "strongest_on_border"  # share of heatmaps whose strongest cell is on the border
IN_CORNER = "strongest_in_corner"  # ... in one of the four corners


@dataclass(frozen=True)
class Probe:
    """A fixed sample of validation users and their profiles, looked at after every epoch."""

    users: Tensor  # (B,)
    profiles: Tensor  # (B, L) items, PAD-filled
    times: Tensor | None = None  # (B, L) when each came (for a model that reads ages)


def attention_probe(task: Task, rng: np.random.Generator, *, size: int = PROBE_USERS) -> Probe:
    """Up to ``size`` users of ``task``, drawn once so every epoch sees the same ones."""
    rows = np.sort(rng.choice(len(task.users), size=min(size, len(task.users)), replace=False))
    times = None if task.times is None else torch.as_tensor(task.times[rows])
    return Probe(torch.as_tensor(task.users[rows]), torch.as_tensor(task.profiles[rows]), times)


def peakedness(weights: Tensor, support: Tensor) -> tuple[float, float]:
    """Mean normalised entropy and mean largest weight of distributions over the last dim.

    ``weights`` (..., n) sum to 1 over ``support`` (..., n, bool) and are 0 elsewhere. Rows with
    fewer than two supported entries have no choice to make and are left out; NaN if none is left.
    """
    count = support.sum(-1)
    rows = count >= 2
    if not bool(rows.any()):
        return math.nan, math.nan
    entropy = -torch.special.xlogy(weights, weights).sum(-1)  # 0 log 0 = 0
    normalised = entropy[rows] / count[rows].double().log()
    return float(normalised.mean()), float(weights.amax(-1)[rows].mean())


@torch.no_grad()
def attention_stats(model: ACF, probe: Probe) -> dict[str, float]:
    """Item- and component-level peakedness on ``probe``; no component statistics for the
    mean-pool ablation, whose component weights are fixed at 1/K."""
    device = model.features.device
    users, profiles = probe.users.to(device), probe.profiles.to(device)
    times = None if probe.times is None else probe.times.to(device)
    attended = model.attend_profiles(users, profiles, times)  # encodes the profiles' items only
    mask = profiles != PAD  # (B, L)
    item_entropy, item_max = peakedness(attended.item_attention, mask)
    stats = {ITEM_ENTROPY: item_entropy, ITEM_MAX: item_max}
    if model.config.component_pool == "attention" and model.uses_images:
        slots = attended.component_attention[mask]  # (S, K), real profile items only
        entropy, largest = peakedness(slots, torch.ones_like(slots, dtype=torch.bool))
        stats |= {COMPONENT_ENTROPY: entropy, COMPONENT_MAX: largest}
        stats |= strongest_cells(slots.argmax(-1).cpu().numpy(), slots.shape[-1])
    return stats


def strongest_cells(strongest: np.ndarray, n_components: int) -> dict[str, float]:
    """Where heatmaps' strongest cells (indices into the grid) lie: the share on the grid's
    border and in its corners, and the share of such cells (what chance would give)."""
    border, corner = grid_regions(n_components)
    return {
        ON_BORDER: float(border[strongest].mean()) if len(strongest) else math.nan,
        "border_chance": float(border.mean()),
        IN_CORNER: float(corner[strongest].mean()) if len(strongest) else math.nan,
        "corner_chance": float(corner.mean()),
    }


def flat_levels(stats: Mapping[str, float], *, threshold: float = FLAT) -> list[str]:
    """The attention levels ("item", "component") whose normalised entropy is above
    ``threshold``; NaN or missing statistics never count as flat."""
    return [level for level, key in LEVELS.items() if stats.get(key, math.nan) > threshold]


ON_OBJECT = 0.25  # a grid cell is "on the object" when the object covers this share of it


def grid_regions(n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(K,) bool masks of the border cells and the four corner cells of a square grid."""
    g = math.isqrt(n_components)
    r, c = np.divmod(np.arange(n_components), g)
    border = (r == 0) | (c == 0) | (r == g - 1) | (c == g - 1)
    corner = ((r == 0) | (r == g - 1)) & ((c == 0) | (c == g - 1))
    return border, corner


@torch.no_grad()
def heatmap_stats(
    model: ACF,
    users: Tensor,
    profiles: Tensor,
    *,
    times: Tensor | None = None,
    object_cover: np.ndarray | None = None,
) -> dict[str, float]:
    """Where the component attention of these users' real profile items goes, against chance.

    - ``component_entropy``: mean normalised entropy (1 = flat);
    - ``strongest_on_border`` / ``strongest_in_corner``: share of heatmaps whose strongest cell
      is on the grid's border / in a corner, with the shares of such cells (``*_chance``);
    - ``item_top_weight_median``: median largest item weight, profiles of 2+ items;
    - with ``object_cover`` ((N, K) share of each cell on the object, items 1..N): the mean
      attention mass on the object's cells (``object_mass``) against their mean share of the
      grid (``object_area``), the share of heatmaps whose strongest cell is on the object,
      and the mass on the object of the weights every item's own image vector pools its
      components with (``image_object_mass``; the area under a mean, see ``item_pool``).
    """
    device = model.features.device
    users, profiles = users.to(device), profiles.to(device)
    times = None if times is None else times.to(device)
    attended = model.attend_profiles(users, profiles, times)  # encodes the profiles' items only
    mask = profiles != PAD
    beta = attended.component_attention[mask].double().cpu().numpy()  # (S, K)
    slot_items = profiles[mask].cpu().numpy()  # (S,)
    strongest = beta.argmax(1)
    entropy, _ = peakedness(torch.as_tensor(beta), torch.ones(beta.shape, dtype=torch.bool))
    several = mask.sum(1) >= 2
    top_item = attended.item_attention[several].amax(1)
    stats = {
        "component_entropy": entropy,
        **strongest_cells(strongest, beta.shape[1]),
        "item_top_weight_median": float(top_item.median()) if len(top_item) else math.nan,
    }
    if object_cover is not None:
        on_object = object_cover[slot_items - 1] >= ON_OBJECT  # (S, K)
        stats |= {
            "object_mass": float((beta * on_object).sum(1).mean()),
            "object_area": float(on_object.mean()),
            "strongest_on_object": float(on_object[np.arange(len(strongest)), strongest].mean()),
        }
        with torch.no_grad():
            weights = model.image_weights(model.reduce(model.features[1:])).double().cpu().numpy()
        stats["image_object_mass"] = float((weights * (object_cover >= ON_OBJECT)).sum(1).mean())
    return stats
