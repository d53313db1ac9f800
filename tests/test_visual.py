"""Known answers for the visual half, in a world where they are known, with the default
training settings (``TrainConfig()``), served through the API.

The world (seed 7, never used while the model was developed) has users who go through runs of
one shape, mostly their favourite: the object's cells are known for every item, the kind is
visible only in the image (colours, positions, sizes and backgrounds are random), and the
newest items tell what comes next.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.config import Settings
from service.model.acf import ACF
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.features import extract_features
from service.offline.data.synthetic import World, WorldSpec, make_world
from service.offline.evaluation.attention import heatmap_stats
from service.offline.evaluation.evaluate import holdout_task
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, fit, prepare, to_checkpoint
from service.offline.training.train import TrainResult

RUN_WORLD = WorldSpec(
    n_users=300, n_items=400, interactions_per_user=30, taste=0.7, run_length=4.0, seed=7
)
TRIALS = 30


@pytest.fixture(scope="module")
def run_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Prepared]:
    world = make_world(tmp_path_factory.mktemp("run-world"), RUN_WORLD)
    data = load_dataset(world.root)
    features = world.root / "features"
    extract_features(data.item_ids.tolist(), list(data.image_paths), features, progress=False)
    return world, prepare(world.root, features)


@pytest.fixture(scope="module")
def trained(run_world: tuple[World, Prepared]) -> TrainResult:
    _, prepared = run_world
    return fit(prepared, TrainConfig(), device=torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def client(
    run_world: tuple[World, Prepared],
    trained: TrainResult,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    world, prepared = run_world
    ckpt = tmp_path_factory.mktemp("visual") / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, trained, TrainConfig()))
    settings = Settings(checkpoint=ckpt, features=world.root / "features", device="cpu")
    app = create_app(settings, profiles=histories(prepared.dataset))
    with TestClient(app) as c:
        yield c


def _of_kind(world: World, kind: int) -> np.ndarray:
    return np.flatnonzero(world.item_kinds == kind) + 1  # item ids are 1..N in this world


def test_component_attention_sits_on_the_object(
    run_world: tuple[World, Prepared], trained: TrainResult
) -> None:
    world, prepared = run_world
    model = trained.model
    assert isinstance(model, ACF)
    task = holdout_task(prepared.split, "standard")  # test users' profiles: no tuning saw them
    stats = heatmap_stats(
        model,
        torch.as_tensor(task.users),
        torch.as_tensor(task.profiles),
        object_cover=world.object_cover,
    )
    assert stats["object_mass"] >= 2 * stats["object_area"], stats
    assert stats["strongest_on_object"] >= 0.8, stats
    assert stats["strongest_in_corner"] <= 2 * stats["corner_chance"], stats


def test_item_attention_does_not_collapse_on_a_profile_of_two_kinds(
    run_world: tuple[World, Prepared], client: TestClient
) -> None:
    world, _ = run_world
    rng = np.random.default_rng(0)
    tops = []
    for _ in range(TRIALS):
        a, b = rng.choice(4, size=2, replace=False)
        history = np.concatenate(
            [
                rng.choice(_of_kind(world, a), 5, replace=False),
                rng.choice(_of_kind(world, b), 4, replace=False),
            ]
        )
        rng.shuffle(history)
        body = {"history": history.tolist(), "item_id": int(_of_kind(world, a)[0])}
        answer = client.post("/explain", json=body).json()
        weights = [p["attention"] for p in answer["profile"]]
        assert len(weights) == 9 and sum(weights) == pytest.approx(1.0, abs=1e-4)
        tops.append(max(weights))
    assert np.median(tops) <= 0.6, sorted(tops)


@pytest.mark.parametrize("known", [False, True], ids=["new user", "known user"])
def test_one_item_of_a_new_kind_brings_that_kind_into_the_next_ranking(
    run_world: tuple[World, Prepared], client: TestClient, known: bool
) -> None:
    """Read-your-writes in the ranking, not only by exclusion: after nine items of kind A, one
    item of kind B puts at least three kind-B items into the top 20."""
    world, _ = run_world
    rng = np.random.default_rng(1 if known else 2)
    brought = []
    for trial in range(TRIALS):
        a, b = (int(k) for k in rng.choice(4, size=2, replace=False))
        user = str(trial * 7) if known else f"visual-new-{trial}"
        nine = rng.choice(_of_kind(world, a), 9, replace=False)
        one = int(rng.choice(np.setdiff1d(_of_kind(world, b), nine)))
        events = [{"user_id": user, "item_id": int(i)} for i in nine]
        assert client.post("/interactions", json={"events": events}).status_code == 200
        before = _kinds(world, client.get(f"/recommend/{user}", params={"k": 20}).json())
        one_more = {"events": [{"user_id": user, "item_id": one}]}
        assert client.post("/interactions", json=one_more).status_code == 200
        after = _kinds(world, client.get(f"/recommend/{user}", params={"k": 20}).json())
        assert (before == a).sum() >= 10  # the profile's kind leads before
        brought.append(int((after == b).sum()))
    assert np.mean(np.array(brought) >= 3) >= 0.9, sorted(brought)


def _kinds(world: World, answer: dict) -> np.ndarray:
    return world.item_kinds[np.array([x["item_id"] for x in answer["items"]]) - 1]


FLAT = 20  # pixels sharing one colour: a flat distractor (the noisy background never repeats)


def _pixels(world: World, item: int) -> np.ndarray:
    return np.asarray(Image.open(world.root / "images" / f"{item}.png").convert("RGB"))


def _outside_object(world: World, item: int) -> np.ndarray:
    """(P, 3) the item's pixels outside its object's box."""
    pixels = _pixels(world, item)
    x0, y0, x1, y1 = world.object_boxes[item - 1]
    outside = np.ones(pixels.shape[:2], bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    return pixels[outside]


def _flat_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colours at least ``FLAT`` of these (P, 3) pixels share, and their counts."""
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return colours[counts >= FLAT], counts[counts >= FLAT]


def test_clutter_is_drawn_under_the_object(tmp_path_factory: pytest.TempPathFactory) -> None:
    spec = WorldSpec(n_users=4, n_items=24, clutter=6, object_min=0.3, object_max=0.45, seed=3)
    world = make_world(tmp_path_factory.mktemp("clutter"), spec)
    squares = np.flatnonzero(world.item_kinds == 1) + 1  # KINDS[1]: a square fills its box
    assert len(squares) == 6
    for item in squares:
        x0, y0, x1, y1 = world.object_boxes[item - 1]
        inside = _pixels(world, item)[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
        assert len(np.unique(inside, axis=0)) == 1  # whole: no distractor on top of it
        assert len(_flat_colours(_outside_object(world, item))[0]) >= 1  # flat distractors
    bads = ({"clutter": -1}, {"object_min": 0.5, "object_max": 0.4}, {"clutter_min": 0.6},
            {"clutter_min": 0.5, "clutter_max": 1.5}, {"clutter_min": 0.0})  # fmt: skip
    for bad in bads:
        with pytest.raises(ValueError, match=r"clutter|object_min"):
            make_world(tmp_path_factory.mktemp("bad"), WorldSpec(**bad))  # type: ignore[arg-type]


def test_distractors_are_as_large_as_asked(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same world with distractors 0.8-1.0 of the object's side instead of the default
    third to half: far more of each image is covered by flat distractor colour."""

    def distractor_share(spec: WorldSpec) -> float:
        world = make_world(tmp_path_factory.mktemp("sizes"), spec)
        shares = []
        for item in range(1, spec.n_items + 1):
            off_object = _outside_object(world, item)
            shares.append(_flat_colours(off_object)[1].sum() / len(off_object))
        return float(np.mean(shares))

    small = WorldSpec(n_users=4, n_items=16, clutter=3, seed=5)
    large = WorldSpec(n_users=4, n_items=16, clutter=3, clutter_min=0.8, clutter_max=1.0, seed=5)
    assert distractor_share(large) > 2 * distractor_share(small)


def test_a_colour_world_tells_kinds_by_shape_and_palette_colour(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``colours=2``: 2 shapes x 2 colours = 4 kinds; each object is drawn in its kind's
    palette colour, and so is every distractor (in another kind's), so the image holds
    palette colours only besides the background."""
    from service.offline.data.synthetic import PALETTE

    spec = WorldSpec(n_users=6, n_items=32, kinds=2, colours=2, clutter=2, seed=4)
    world = make_world(tmp_path_factory.mktemp("colours"), spec)
    assert spec.classes == 4 and sorted(set(world.item_kinds)) == [0, 1, 2, 3]
    assert set(world.user_kinds) <= {0, 1, 2, 3}
    palette = np.array(list(PALETTE.values()))
    for item in np.flatnonzero(world.item_kinds % 2 == 1) + 1:  # squares fill their box
        x0, y0, x1, y1 = world.object_boxes[item - 1]
        colour = _pixels(world, item)[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).mean(0)
        nearest = int(np.abs(palette - colour).sum(1).argmin())
        assert nearest == world.item_kinds[item - 1] // 2  # red for kind 1, green for kind 3
    flat = np.concatenate(  # distractors (some hide under the object): palette colours +-20
        [_flat_colours(_outside_object(world, item))[0] for item in range(1, spec.n_items + 1)]
    )
    assert len(flat) >= spec.n_items
    assert np.abs(flat[:, None, :].astype(int) - palette[None]).max(-1).min(-1).max() <= 20
    names = (world.root / "items.csv").read_text()
    assert "red circle" in names and "green square" in names
    with pytest.raises(ValueError, match="colours"):
        make_world(tmp_path_factory.mktemp("bad"), WorldSpec(colours=len(PALETTE) + 1))
