"""Fitting the backbone's last stage to posters (service/offline/data/adapt.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.model.backbones import default_weights_file, load_backbone
from service.offline.data.adapt import AdaptConfig, adapt_backbone, genre_targets, taste_targets
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import KINDS, World

# The stage that is fitted; everything else must come back as shipped
FITTED = ("_blocks.15.", "_conv_head.", "_bn1.")


def test_the_fitted_stage_beats_a_read_out_of_the_shipped_grid_and_nothing_before_it_moves(
    world: World, tmp_path: Path
) -> None:
    data = load_dataset(world.root)
    genres = tuple(frozenset({KINDS[k]}) for k in world.item_kinds)
    targets, keep = genre_targets(genres)
    assert keep.all() and (targets.sum(1) == 1).all()
    out = tmp_path / "adapted.pth"
    config = AdaptConfig(epochs=3, lr=1e-3, held_out=0.25)
    adapted = adapt_backbone(list(data.image_paths), targets, out, config, progress=False)
    read_out_loss, kept_loss = adapted.held_loss
    assert adapted.best_epoch > 0 and kept_loss < read_out_loss  # on posters it was not fitted on
    assert adapted.items == len(targets) - round(0.25 * len(targets))

    moved = _moved(out)
    assert moved and all(k.startswith(FITTED) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("_blocks.15.") for k in moved)  # the block, not only the head
    backbone = load_backbone("efficientnet_lite0", weights=out)  # strict: a usable weights file
    assert backbone.weights_id != load_backbone("efficientnet_lite0").weights_id

    still = AdaptConfig(epochs=2, lr=0.0)  # no epoch can beat the read-out: nothing is written
    assert adapt_backbone(list(data.image_paths)[:40], targets[:40], out, still).best_epoch == 0
    assert not _moved(out)


def _moved(weights: Path) -> set[str]:
    shipped = torch.load(default_weights_file("efficientnet_lite0"), map_location="cpu")
    fitted = torch.load(weights, map_location="cpu")
    assert fitted.keys() == shipped.keys()
    return {k for k in shipped if not torch.equal(shipped[k], fitted[k])}


def test_taste_vectors_put_items_chosen_by_the_same_people_together() -> None:
    rng = np.random.default_rng(0)
    # 40 users, 20 items: users 0-19 choose among items 1-10, users 20-39 among items 11-20
    users, items = [], []
    for user in range(40):
        group = np.arange(1, 11) if user < 20 else np.arange(11, 21)
        chosen = rng.choice(group, size=6, replace=False)
        users += [user] * 6
        items += chosen.tolist()
    vectors, keep = taste_targets(
        np.array(users), np.array(items), 40, 21, dim=4, least=5
    )  # item 21 nobody chose
    assert vectors.shape == (21, 4)
    assert np.allclose(np.linalg.norm(vectors[:20], axis=1), 1, atol=1e-5)
    assert not keep[20] and keep[:20].all()
    similar = vectors[:20] @ vectors[:20].T
    group = np.arange(20) < 10
    same = group[:, None] == group[None, :]
    across = ~same
    np.fill_diagonal(same, False)
    assert similar[same].mean() > similar[across].mean() + 0.5
