"""``POST /items``: a never-trained item served from its image alone (cold start).

The world has eight shapes of 25 items each, so a user's unseen items of their current kind
about fit in a top 20: the known answer for a new item is "ranked with its kind, above the
others". (With hundreds of items a kind, no model could put one particular new item in every
such user's top 20: within a kind the world's items are interchangeable.)
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from service.api.app import create_app
from service.api.items import Items, decode_image
from service.config import Settings
from service.errors import Refused
from service.model.backbones import default_weights_file, weights_identity
from service.model.checkpoint import load_checkpoint, save_checkpoint
from service.model.feature_store import BACKBONE_FILE, META_FILE, load_features
from service.model.tags import item_tags
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.features import extract_features
from service.offline.data.sampling import last_items
from service.offline.data.synthetic import World, WorldSpec, make_world
from service.offline.evaluation.evaluate import holdout_task, rank_new_items
from service.offline.experiments.cold import ColdTargets, served_scores
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import Prepared, fit, prepare, to_checkpoint
from service.store.items import (
    READ_BYTES,
    AddedItem,
    DirectoryItemStore,
    MemoryItemStore,
    RedisItemStore,
)
from service.store.profiles import StoreUnavailable
from service.store.redis.client import redis_client

COLD_WORLD = WorldSpec(
    n_users=300,
    n_items=200,
    kinds=8,
    interactions_per_user=16,
    taste=0.7,
    run_length=4.0,
    new_per_kind=2,
    seed=11,
)
ADMIN = "admin-key-0123456789abcdef"
WRITER = "write-key-0123456789abcdef"
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Prepared, Path]:
    world = make_world(tmp_path_factory.mktemp("cold-world"), COLD_WORLD)
    data = load_dataset(world.root)
    features = world.root / "features"
    extract_features(data.item_ids.tolist(), list(data.image_paths), features, progress=False)
    prepared = prepare(world.root, features)
    result = fit(prepared, TrainConfig(), device=torch.device("cpu"), progress=False)
    ckpt = world.root / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, TrainConfig()))
    return world, prepared, ckpt


def _settings(cold: tuple[World, Prepared, Path], **extra: object) -> Settings:
    world, _, ckpt = cold
    base: dict[str, object] = {
        "environment": "production",
        "api_keys": WRITER,
        "admin_keys": ADMIN,
        "checkpoint": ckpt,
        "features": world.root / "features",
        "device": "cpu",
        "data": world.root,
    }
    return Settings(**(base | extra))  # type: ignore[arg-type]


@pytest.fixture
def client(cold: tuple[World, Prepared, Path]) -> Iterator[TestClient]:
    app = create_app(_settings(cold), profiles=histories(cold[1].dataset))
    with TestClient(app) as c:
        yield c


class _LateStore:
    """An item store whose next answers are lost: ``stores`` says whether the call applied."""

    def __init__(self, inner: Any, outcomes: list[bool]) -> None:
        self.inner, self.outcomes = inner, outcomes

    async def add(self, item: AddedItem) -> bool:
        if not self.outcomes:
            return bool(await self.inner.add(item))
        if self.outcomes.pop(0):
            await self.inner.add(item)
            raise StoreUnavailable("Redis did not answer in time", maybe_applied=True)
        raise StoreUnavailable("Redis refused the call (OOM)", maybe_applied=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("stored", [True, False], ids=["answer-lost", "refused"])
def test_a_refused_add_says_whether_it_applied_and_its_retry_succeeds(
    cold: tuple[World, Prepared, Path], stored: bool
) -> None:
    """The answer was 503 "nothing was changed" though the item had been stored, and the
    retry got 409."""
    world, prepared, _ = cold
    with TestClient(create_app(_settings(cold), profiles=histories(prepared.dataset))) as c:
        items = c.app_state["app_state"].items
        items.store = _LateStore(items.store, [stored])
        item = _new_ids(world)[1]
        first = _add(c, world, item)
        assert first.status_code == 503 and first.headers["Retry-After"] == "1"
        assert first.json()["nothing_applied"] is (not stored)
        assert ("may have been stored" in first.json()["detail"]) is stored
        retry = _add(c, world, item)
        assert retry.status_code == 201, retry.text
        assert _add(c, world, item).status_code == 201  # and again: the same item
        other = c.post(
            "/items",
            data={"item_id": str(item)},
            files={"image": ("x.png", _png(8, 8))},
            headers={"X-API-Key": ADMIN},
        )
        assert other.status_code == 409  # another image under the id
        assert c.get("/readyz").json()["items"] == COLD_WORLD.n_items + 1


def _new_ids(world: World) -> list[int]:
    return [COLD_WORLD.n_items + j + 1 for j in range(len(world.new_kinds))]


def _add(client: TestClient, world: World, item_id: int, key: str = ADMIN, **form: str | list[str]):  # type: ignore[no-untyped-def]
    image = (world.root / "new" / f"{item_id}.png").read_bytes()
    return client.post(
        "/items",
        data={"item_id": str(item_id), "title": f"new #{item_id}", **form},
        files={"image": (f"{item_id}.png", image, "image/png")},
        headers={"X-API-Key": key},
    )


def test_a_new_item_is_recommended_to_users_of_its_kind_from_its_image(
    cold: tuple[World, Prepared, Path], client: TestClient
) -> None:
    world, prepared, _ = cold
    for item in _new_ids(world):
        answer = _add(client, world, item)
        assert answer.status_code == 201, answer.text
        assert answer.json()["items"] == item  # ids N+1.. are added in order
    # Who wants kind A now: the users whose next item (the held-out test item) is of kind A.
    task = holdout_task(prepared.split, "standard")
    wants = world.item_kinds[task.targets - 1]
    user_ids = prepared.dataset.user_ids[task.users]
    tops = [
        {x["item_id"] for x in client.get(f"/recommend/{u}", params={"k": 20}).json()["items"]}
        for u in user_ids
    ]
    same, others = [], []
    for item, kind in zip(_new_ids(world), world.new_kinds, strict=True):
        inside = np.array([item in top for top in tops])
        same.append(inside[wants == kind].mean())
        others.append(inside[wants != kind].mean())
    assert np.median(same) >= 0.7 and min(same) >= 0.6, np.round(same, 2)
    assert max(others) < 0.1, np.round(others, 3)
    item = _new_ids(world)[0]
    why = client.get(f"/explain/{user_ids[0]}", params={"item_id": item})
    assert why.status_code == 200 and np.isfinite(why.json()["score"])
    info = client.get(f"/items/{item}").json()
    assert info["image_url"] == f"/items/{item}/image" and info["added"] is True
    trained = client.get("/items/1").json()  # the page marks the added items only
    assert trained["added"] is False and trained["genres"] == sorted(prepared.dataset.genres[0])
    image = client.get(f"/items/{item}/image")
    assert image.content == (world.root / "new" / f"{item}.png").read_bytes()
    assert image.headers["content-type"] == "image/png"
    history = client.post("/recommend", json={"history": [item], "k": 5})
    assert history.status_code == 200  # a profile can hold it too


def test_new_items_ranked_offline_are_of_the_kind_each_user_picks_next(
    cold: tuple[World, Prepared, Path], tmp_path: Path
) -> None:
    """What `make reproduce` reports for new items: the same serving path, offline."""
    world, prepared, path = cold
    ckpt = load_checkpoint(path)
    raw, meta = load_features(world.root / "features")
    model = ckpt.build_model(raw, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids)
    ids = _new_ids(world)
    paths = [world.root / "new" / f"{i}.png" for i in ids]
    extract_features(ids, paths, tmp_path / "new", progress=False)
    new, _ = load_features(tmp_path / "new")
    task = holdout_task(prepared.split, "standard")
    top = rank_new_items(model, ckpt.feature_map, new, task, k=2, device=torch.device("cpu"))
    assert top.shape == (len(task.users), 2) and (top[:, 0] != top[:, 1]).all()
    wants = world.item_kinds[task.targets - 1]
    precision = (world.new_kinds[top] == wants[:, None]).mean()
    assert precision >= 4 / COLD_WORLD.kinds, precision  # chance: 1 / kinds


@pytest.fixture(scope="module")
def with_metadata(cold: tuple[World, Prepared, Path]) -> Path:
    """ACF trained with the items' genres and titles as a second content channel."""
    world, prepared, _ = cold
    config = TrainConfig(metadata=True, titles=True)
    result = fit(prepared, config, device=torch.device("cpu"), progress=False)
    path = world.root / "acf-genres.pt"
    save_checkpoint(path, to_checkpoint(prepared, result, config))
    return path


@pytest.mark.parametrize("metadata", [False, True], ids=["image", "image-and-metadata"])
def test_the_cold_protocols_scores_are_what_the_api_answers_for_the_same_items(
    cold: tuple[World, Prepared, Path], with_metadata: Path, tmp_path: Path, metadata: bool
) -> None:
    """`make reproduce`'s cold-item figures score new items with ``served_scores``; the API
    scores the same items, uploaded through ``POST /items`` (with their title and genres),
    within float16 table rounding."""
    world, prepared, path = cold
    path = with_metadata if metadata else path
    data, n = prepared.dataset, prepared.dataset.n_items
    kind_genres = {int(world.item_kinds[i]): data.genres[i] for i in range(n)}
    genres = [kind_genres[int(k)] for k in world.new_kinds]  # the kind's name, as in items.csv
    ids = _new_ids(world)
    titles = [f"{' '.join(names)} #{item}" for item, names in zip(ids, genres, strict=True)]
    settings = _settings(cold).model_copy(update={"checkpoint": path})
    with TestClient(create_app(settings, profiles=histories(data))) as client:
        for item, names, title in zip(ids, genres, titles, strict=True):
            answer = _add(client, world, item, genres="|".join(names), title=title)
            assert answer.status_code == 201, answer.text
            assert answer.json()["genres"] == sorted(names)
            assert answer.json()["genres_read"] == (sorted(names) if metadata else [])
            words = sorted(f"word:{w}" for name in names for w in name.split())
            assert answer.json()["title_read"] == (words if metadata else [])
        ckpt = load_checkpoint(path)
        raw, meta = load_features(world.root / "features")
        model = ckpt.build_model(raw, inputs_hash=meta.inputs_hash, item_ids=meta.item_ids)
        paths = [world.root / "new" / f"{i}.png" for i in ids]
        extract_features(ids, paths, tmp_path, progress=False)
        new, _ = load_features(tmp_path)
        users = np.arange(0, data.n_users, 15)
        index = {int(raw_id): i for i, raw_id in enumerate(data.item_ids.tolist(), start=1)}
        seen = histories(data)
        profiles = last_items(
            [np.array([index[i] for i in seen[str(data.user_ids[u])]]) for u in users], 9
        )
        part = ColdTargets(users, profiles, (), np.zeros_like(profiles))
        offline, blind = (
            served_scores(
                model,
                ckpt.feature_map,
                part,
                np.arange(n + 1, n + len(ids) + 1),
                np.concatenate([raw, new]),
                [*data.tags, *known],
                device=torch.device("cpu"),
            )[:, n:]
            for known in (
                [item_tags(t, g) for t, g in zip(titles, genres, strict=True)],
                [frozenset()] * len(ids),
            )
        )
        answers = [
            [client.get(f"/explain/{data.user_ids[u]}", params={"item_id": i}).json() for i in ids]
            for u in users
        ]
        api = np.array([[a["score"] for a in row] for row in answers])
        # A model with metadata says which of the item's tags the profile shares
        tags = {t["tag"] for row in answers for a in row for t in a["tags"]}
        assert (tags >= set(genres[0])) if metadata else not tags
    spread = float(offline.std())
    np.testing.assert_allclose(api, offline, rtol=0, atol=0.01 * spread)
    assert spread > 0 and not np.allclose(offline, offline[:, :1])  # the items differ
    # Only a model with metadata reads the title and genres
    assert np.allclose(offline, blind) is not metadata


def test_new_images_are_read_with_the_weights_the_catalogue_was_read_with(
    cold: tuple[World, Prepared, Path], tmp_path: Path
) -> None:
    """`visrec features --weights FILE` read the catalogue's posters with FILE, and POST
    /items read a new poster with the shipped weights: its grid sat among grids read by
    another network, and nothing said so."""
    world, _, _ = cold
    shipped_id = weights_identity("efficientnet_lite0")
    assert load_features(world.root / "features")[1].weights_id == shipped_id
    tensors = torch.load(default_weights_file("efficientnet_lite0"), map_location="cpu")
    tensors["_conv_head.weight"] = tensors["_conv_head.weight"] * 1.01
    other = tmp_path / "other.pth"
    torch.save(tensors, other)
    features = tmp_path / "features"  # the grids stand in for ones read with `other`:
    shutil.copytree(world.root / "features", features)  # only new images are read here
    meta = json.loads((features / META_FILE).read_text())
    (features / META_FILE).write_text(
        json.dumps(meta | {"weights_id": weights_identity("efficientnet_lite0", weights=other)})
    )
    item = _new_ids(world)[3]
    with TestClient(create_app(_settings(cold, features=features))) as c:
        refused = _add(c, world, item)
        assert refused.status_code == 409, refused.text
        assert "VISREC_BACKBONE_WEIGHTS" in refused.json()["detail"]
        assert c.get(f"/items/{item}").status_code == 404  # nothing added
        assert c.post("/recommend", json={"history": [1]}).status_code == 200  # the rest serves
    with TestClient(create_app(_settings(cold, features=features, backbone_weights=other))) as c:
        assert _add(c, world, item).status_code == 201
        assert c.post("/recommend", json={"history": [item]}).status_code == 200
    shutil.copy(other, features / BACKBONE_FILE)  # as `visrec reproduce` keeps a fitted one
    with TestClient(create_app(_settings(cold, features=features))) as c:
        assert _add(c, world, item).status_code == 201


def test_bad_uploads_are_refused_and_change_nothing(
    cold: tuple[World, Prepared, Path], client: TestClient
) -> None:
    world, _, _ = cold
    item = _new_ids(world)[0]
    before = client.get("/readyz").json()["items"]
    refused = [
        _add(client, world, item, key=WRITER),  # a writer is not an admin
        client.post(
            "/items",
            data={"item_id": str(item)},
            files={"image": ("x.png", b"not an image")},
            headers={"X-API-Key": ADMIN},
        ),
        client.post(
            "/items",
            data={"item_id": "1"},
            files={"image": ("x.png", _png(8, 8))},
            headers={"X-API-Key": ADMIN},
        ),  # item 1 exists
        client.post("/items", data={"item_id": str(item)}, headers={"X-API-Key": ADMIN}),
    ]
    for title in ("a\x00b", "evil\u202egnp.exe", "caf\x8e"):  # \x8e: bad UTF-8 as Latin-1
        refused.append(
            client.post(
                "/items",
                data={"item_id": str(item), "title": title},
                files={"image": ("x.png", _png(8, 8))},
                headers={"X-API-Key": ADMIN},
            )
        )
    for title in ("Amélie".encode()[:3], "Amélie".encode("latin-1")):  # cut; not UTF-8
        refused.append(
            client.post(
                "/items",
                data={"item_id": str(item), "title": title},  # type: ignore[dict-item]
                files={"image": ("x.png", _png(8, 8))},
                headers={"X-API-Key": ADMIN},
            )
        )
    for attribute in ("colour", "colour:", "colour:a\x01", "genres:Comedy"):
        refused.append(_add(client, world, item, attribute=attribute))
    assert [r.status_code for r in refused] == [401, 415, 409, 422, 422, 422, 422, 400, 400] + [
        422
    ] * 4
    assert all("attribute" in str(r.json()["detail"]) for r in refused[-4:])
    assert "already in the catalogue" in refused[2].json()["detail"]
    assert all("title" in str(r.json()["detail"]) for r in refused[4:9])
    assert all("'title' is not valid utf-8" in r.json()["detail"] for r in refused[7:9])
    assert client.get("/readyz").json()["items"] == before
    assert client.post("/recommend", json={"history": [item]}).status_code == 422


def test_images_over_the_limits_are_refused(cold: tuple[World, Prepared, Path]) -> None:
    world, prepared, _ = cold
    settings = _settings(cold, max_image_bytes=4096, max_image_pixels=10_000)
    with TestClient(create_app(settings, profiles=histories(prepared.dataset))) as c:
        item = str(_new_ids(world)[0])
        big = c.post(
            "/items",
            data={"item_id": item},
            files={"image": ("a.png", _png(200, 200, noise=True))},
            headers={"X-API-Key": ADMIN},
        )
        wide = c.post(
            "/items",
            data={"item_id": item},
            files={"image": ("a.png", _png(101, 100))},
            headers={"X-API-Key": ADMIN},
        )
        assert (big.status_code, wide.status_code) == (413, 413), (big.text, wide.text)
        assert "101x100" in wide.json()["detail"]
        assert c.get("/readyz").json()["items"] == COLD_WORLD.n_items


def test_added_items_survive_a_restart_a_reload_and_reach_every_replica(
    cold: tuple[World, Prepared, Path], tmp_path: Path
) -> None:
    world, _, _ = cold
    item = _new_ids(world)[1]
    prefix = f"test-items-{uuid.uuid4().hex}"
    shared = {"redis_url": REDIS, "redis_prefix": prefix, "items_sync_s": 0.2}
    try:
        with (
            TestClient(create_app(_settings(cold, **shared))) as a,
            TestClient(create_app(_settings(cold, **shared))) as b,
        ):
            added = _add(a, world, item, attribute=ATTRIBUTES)
            assert added.status_code == 201 and added.json()["attributes"] == ATTRIBUTES_READ
            deadline = time.monotonic() + 10
            while b.post("/recommend", json={"history": [item]}).status_code != 200:
                assert time.monotonic() < deadline, "the other replica never got the item"
                time.sleep(0.1)
            assert _only_violet(b) == [item]  # its attributes came with it
            assert _add(b, world, item, attribute=ATTRIBUTES).status_code == 201  # a retry
            assert _add(b, world, item).status_code == 409  # not the same item: no attributes
            other = b.post(
                "/items",
                data={"item_id": str(item)},
                files={"image": ("x.png", _png(8, 8))},
                headers={"X-API-Key": ADMIN},
            )
            assert other.status_code == 409  # one id, one item, across replicas
            assert a.post("/admin/reload", headers={"X-API-Key": ADMIN}).status_code == 200
            assert a.post("/recommend", json={"history": [item]}).status_code == 200
        with TestClient(create_app(_settings(cold, **shared))) as restarted:
            assert restarted.post("/recommend", json={"history": [item]}).status_code == 200
            assert _only_violet(restarted) == [item]
    finally:
        _forget(prefix)
    folder = {"items_dir": tmp_path / "added"}
    with TestClient(create_app(_settings(cold, **folder))) as c:
        assert _add(c, world, item, attribute=ATTRIBUTES).status_code == 201
    with TestClient(create_app(_settings(cold, **folder))) as c:
        assert c.post("/recommend", json={"history": [item]}).status_code == 200
        info = c.get(f"/items/{item}").json()
        assert info["title"] == f"new #{item}" and info["attributes"] == ATTRIBUTES_READ
        assert _only_violet(c) == [item]


# An added item's attributes, as sent (name:value,value fields) and as read back (sorted)
ATTRIBUTES = ["size:M,L", "colour:violet"]
ATTRIBUTES_READ = {"colour": ["violet"], "size": ["L", "M"]}


def _only_violet(client: TestClient) -> list[int]:
    """The items a filter on the added item's colour lets through: no other item has one."""
    body = {"history": [1], "k": 50, "filters": {"attributes": {"colour": ["violet"]}}}
    answer = client.post("/recommend", json=body, headers={"X-API-Key": ADMIN})
    assert answer.status_code == 200, answer.text
    return [i["item_id"] for i in answer.json()["items"]]


def test_added_items_lost_by_redis_are_reported_and_put_back(
    cold: tuple[World, Prepared, Path],
) -> None:
    """After FLUSHALL an old process served 415 items and a new one 400, and the new one
    took the same id with another image: one id named two items, for good."""
    world, _, _ = cold
    item = _new_ids(world)[2]
    prefix = f"test-items-{uuid.uuid4().hex}"
    shared = {"redis_url": REDIS, "redis_prefix": prefix, "items_sync_s": 0.2}
    redis = Redis.from_url(REDIS)
    try:
        with TestClient(create_app(_settings(cold, **shared))) as old:
            assert _add(old, world, item).status_code == 201
            assert old.get("/readyz").json()["items_lost"] is None
            redis.delete(f"{prefix}:items")  # Redis lost its data
            deadline = time.monotonic() + 10
            while not redis.hexists(f"{prefix}:items", str(item)):
                assert time.monotonic() < deadline, "the lost item was never put back"
                time.sleep(0.1)
            lost = old.get("/readyz").json()["items_lost"]
            assert "lost 1 added item(s)" in lost and "1 put back" in lost
            assert "visrec_added_items_lost_total 1.0" in old.get("/metrics").text
            with TestClient(create_app(_settings(cold, **shared))) as new:
                assert new.post("/recommend", json={"history": [item]}).status_code == 200
                another = new.post(
                    "/items",
                    data={"item_id": str(item)},
                    files={"image": ("x.png", _png(8, 8))},
                    headers={"X-API-Key": ADMIN},
                )
                assert another.status_code == 409  # the id still names one item
    finally:
        redis.close()
        _forget(prefix)


def _forget(prefix: str) -> None:
    with Redis.from_url(REDIS) as redis:
        for key in redis.scan_iter(f"{prefix}:*"):
            redis.delete(key)


def _scores(client: TestClient, history: list[int]) -> dict[int, float]:
    answer = client.post("/recommend", json={"history": history, "k": 50})
    assert answer.status_code == 200, answer.text
    return {i["item_id"]: i["score"] for i in answer.json()["items"]}


def test_a_restart_serves_added_items_from_their_kept_rows_and_reads_features_after(
    cold: tuple[World, Prepared, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start read every added item's raw features (125 KB each) from Redis and projected
    them: with 10,000 items, 2.5 s of a start, and a 3-replica restart took 20.7 s. The rows
    through the model's projection are kept beside the items by whoever projected them; a
    start reads those and the items without features, and the features follow in the
    background (for put-back and for a model with another projection)."""
    world, _, _ = cold
    new = _new_ids(world)[:3]
    prefix = f"test-items-{uuid.uuid4().hex}"
    shared = {"redis_url": REDIS, "redis_prefix": prefix, "items_sync_s": 0}
    asked: list[int] = []
    whole = RedisItemStore.get

    async def counted(store: RedisItemStore, ids: list[int]) -> list[AddedItem]:
        asked.extend(ids)
        return await whole(store, ids)

    async def not_in_background(items: Items) -> None:  # read_features is called below
        pass

    try:
        with TestClient(create_app(_settings(cold, **shared))) as first:
            assert all(_add(first, world, i).status_code == 201 for i in new)
            before = _scores(first, new[:1])
        monkeypatch.setattr(RedisItemStore, "get", counted)
        monkeypatch.setattr(Items, "keep_features", not_in_background)
        with TestClient(create_app(_settings(cold, **shared))) as restarted:
            assert asked == []  # no raw features read to start
            after = _scores(restarted, new[:1])
            assert after.keys() == before.keys() and new[1] in after  # of the same kind
            assert restarted.get("/readyz").json()["items"] == COLD_WORLD.n_items + len(new)
            assert all(after[i] == pytest.approx(before[i], rel=1e-4, abs=1e-4) for i in after)
            items = restarted.app_state["app_state"].items
            assert all(items.known[i].features.size == 0 for i in new)
            restarted.portal.call(items.read_features)
            assert sorted(asked) == new
            assert all(items.known[i].features.shape == (49, 1280) for i in new)
            items.rows = (None, {})  # as a model with another projection finds them
            assert restarted.post("/admin/reload", headers={"X-API-Key": ADMIN}).status_code == 200
            assert _scores(restarted, new[:1]).keys() == before.keys()
    finally:
        _forget(prefix)


def _png(width: int, height: int, *, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3)) if noise else np.zeros((height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels (what a decompression bomb sends)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        # Pillow's own bomb bound came first and answered 415 with its internal message
        (_png_header(20_000, 20_000), 413, "over 40000000 pixels"),
        # within the pixel bound, but took 6 s to decode and resize
        (_png(1, 30_000), 413, "1x30000, over 20 times longer than wide"),
    ],
    ids=["bomb", "strip"],
)
def test_huge_or_elongated_images_are_refused_from_their_header(
    data: bytes, status: int, words: str
) -> None:
    with pytest.raises(Refused) as refused:
        decode_image(data, 40_000_000)
    assert refused.value.status == status and words in refused.value.detail


def test_a_cameras_multi_picture_jpeg_is_read() -> None:
    """MPO (a JPEG with several pictures, as cameras write them) was refused with 415."""
    out = io.BytesIO()
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    first.save(out, format="MPO", save_all=True, append_images=[second])
    picture, media_type = decode_image(out.getvalue(), 40_000_000)
    assert (picture.format, media_type, picture.size) == ("MPO", "image/jpeg", (64, 48))


def test_a_redis_item_store_that_cannot_answer_is_an_outage_not_an_error() -> None:
    """Without a Redis, the store says StoreUnavailable (the API's 503, retry later), and
    that nothing was applied; a Redis that answers keeps the id once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once it is closed
    item = AddedItem(7, "t", "image/png", b"png", np.zeros((49, 8), dtype=np.float16))

    async def refused() -> StoreUnavailable:
        store = RedisItemStore.from_url(f"redis://127.0.0.1:{port}/0", prefix="x", deadline_s=1)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.add(item)
            return caught.value
        finally:
            await store.close()

    assert not asyncio.run(refused()).maybe_applied

    prefix = f"test-items-{uuid.uuid4().hex}"

    store = RedisItemStore.from_url(REDIS, prefix=prefix, deadline_s=1)
    try:
        assert asyncio.run(_adds(store, item)) == [True, True, False]
    finally:
        Redis.from_url(REDIS).delete(f"{prefix}:items")


async def _adds(store: Any, item: AddedItem) -> list[bool]:
    """Adding ``item``, the same again (a retry), then another image under its id."""
    try:
        other = replace(item, image=b"another image")
        return [await store.add(item), await store.add(item), await store.add(other)]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "directory"])
def test_an_item_sent_again_is_taken_and_another_under_its_id_is_not(
    kind: str, tmp_path: Path
) -> None:
    """A retry after a lost answer must succeed (it got 409); the Redis store's case is
    in the test above."""
    item = AddedItem(7, "t", "image/png", b"png", np.zeros((49, 8), dtype=np.float16), ("Drama",))
    store = MemoryItemStore() if kind == "memory" else DirectoryItemStore(tmp_path)
    assert asyncio.run(_adds(store, item)) == [True, True, False]
    other_genres = replace(item, genres=("Comedy",))  # the same image, said to be another film
    assert asyncio.run(store.add(other_genres)) is False


class _CountingClient:
    """A Redis client that records how many bytes and fields each HMGET answers."""

    def __init__(self, client: Any) -> None:
        self.client, self.answered = client, []

    async def hmget(self, key: str, fields: list[str]) -> Any:
        values = await self.client.hmget(key, fields)
        self.answered.append((len(fields), sum(len(v or b"") for v in values)))
        return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_added_items_are_read_in_pieces_bounded_in_bytes() -> None:
    """Start-up read every added item in one HMGET under the 250 ms read deadline: from ~600
    items (>= 125 KB each) on, no process could start. Pieces of 16 items were no bound
    either: an image may be 10 MB. Each call now answers at most READ_BYTES, or one item."""
    prefix = f"test-items-{uuid.uuid4().hex}"
    counting = _CountingClient(redis_client(REDIS))
    store = RedisItemStore(counting, prefix=prefix, deadline_s=5)  # type: ignore[arg-type]
    genres = [(), ("Animation",), ("Children's", "Comedy")]
    big = bytes(READ_BYTES + 1)  # an image over a piece on its own
    items = [
        AddedItem(
            i,
            f"t{i}",
            "image/png",
            big if i == 7 else bytes([i]),
            np.full((49, 1280), i, np.float16),  # 125 KB, as EfficientNet-Lite0's
            genres[i % 3],
        )
        for i in range(1, 41)
    ]
    ids = [item.item_id for item in items]

    async def round_trip() -> tuple[list[AddedItem], list[AddedItem]]:
        try:
            assert all([await store.add(item) for item in items])
            return await store.get([*ids, 99]), await store.about(ids)
        finally:
            await store.close()

    try:
        read, about = asyncio.run(round_trip())
    finally:
        _forget(prefix)
    assert [i.item_id for i in read] == ids  # 99 was never stored
    assert all(
        a.same_as(b) and a.genres == b.genres and np.array_equal(a.features, b.features)
        for a, b in zip(read, items, strict=True)
    )
    assert all(a.same_as(b) and a.features.size == 0 for a, b in zip(about, items, strict=True))
    fields = [n for n, _ in counting.answered]
    assert sum(fields) == 80 and len(fields) >= 4
    assert all(size <= READ_BYTES or n == 1 for n, size in counting.answered)
