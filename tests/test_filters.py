"""Filters on /recommend: applied inside the search, every answer passes them and has exactly
min(k, passing) items; unknown names are refused, an empty result is explained."""

from __future__ import annotations

import asyncio
import csv
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from service.api.app import create_app
from service.config import Settings
from service.diversity import intra_list_similarity, rerank
from service.filters import Attributes, ItemFilter, year_of
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.store.switches import FileSwitches

CONFIG = TrainConfig(dim=16, attention_dim=16, epochs=3, batch_size=128, lr=1e-2)
READER, ADMIN = "read-key-0123456789abcdef", "admin-key-0123456789abcdef"
READ, ADMINISTER = {"X-API-Key": READER}, {"X-API-Key": ADMIN}
REDIS = "redis://127.0.0.1:6379/0"


def _catalogue(world: World, folder: Path) -> dict[int, tuple[set[str], int | None]]:
    """The world's items.csv with a year in most titles and a second genre on some: (genres,
    year) of each item."""
    folder.mkdir(exist_ok=True)
    rows = list(csv.DictReader((world.root / "items.csv").open()))
    out = {}
    with (folder / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres", "image"])
        for row in rows:
            n = int(row["item_id"])
            year = None if n % 7 == 0 else 1970 + n % 40
            title = row["title"] + ("" if year is None else f" ({year})")
            genres = {row["genres"], *(["Classic"] if n % 5 == 0 else [])}
            w.writerow([n, title, "|".join(sorted(genres)), ""])
            out[n] = (genres, year)
    return out


Catalogue = dict[int, tuple[set[str], int | None]]


@pytest.fixture(scope="module")
def model(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, Catalogue, dict[str, list[int]]]:
    """Settings that serve a model of the world, with a catalogue of genres and years."""
    folder = tmp_path_factory.mktemp("filters")
    items = _catalogue(world, folder / "data")
    prepared = prepare(world.root, world_features[0])
    result = fit(prepared, CONFIG, device=torch.device("cpu"), progress=False)
    ckpt = folder / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, CONFIG))
    settings = Settings(
        checkpoint=ckpt,
        features=world_features[0],
        device="cpu",
        data=folder / "data",
        environment="production",
        api_keys=READER,
        admin_keys=ADMIN,
    )
    return settings, items, histories(load_dataset(world.root))


@pytest.fixture(scope="module")
def served(
    model: tuple[Settings, Catalogue, dict[str, list[int]]],
) -> Iterator[tuple[TestClient, Catalogue, dict[str, list[int]]]]:
    settings, items, profiles = model
    with TestClient(create_app(settings, profiles=profiles), headers=READ) as client:
        yield client, items, profiles


def _passes(
    item: tuple[set[str], int | None],
    genres: set[str],
    exclude: set[str],
    lo: int | None,
    hi: int | None,
) -> bool:
    have, year = item
    if (genres and not have & genres) or have & exclude:
        return False
    if (lo is not None or hi is not None) and year is None:
        return False
    return (lo is None or year >= lo) and (hi is None or year <= hi)  # type: ignore[operator]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_every_answer_passes_its_filters_and_has_exactly_min_k_passing_items(
    served: tuple[TestClient, dict[int, tuple[set[str], int | None]], dict[str, list[int]]],
    data: st.DataObject,
) -> None:
    """For random filters, users and k (GET for a stored user, POST for a history): every item
    passes, none is excluded or already seen, and the answer has min(k, passing) items, with
    passing counted here from items.csv."""
    client, items, profiles = served
    names = sorted({g for genres, _ in items.values() for g in genres})
    genres = set(data.draw(st.lists(st.sampled_from(names), max_size=3)))
    exclude = set(data.draw(st.lists(st.sampled_from(names), max_size=2)))
    lo = data.draw(st.none() | st.integers(1960, 2015))
    hi = data.draw(st.none() | st.integers(1960, 2015))
    banned = set(data.draw(st.lists(st.sampled_from(sorted(items)), max_size=30)))
    k = data.draw(st.integers(1, 60))
    user = data.draw(st.sampled_from(sorted(profiles)))
    diversity = data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    seen = set(profiles[user])
    filtered = True  # False: a GET without filters, whose answer has no passing count
    if data.draw(st.booleans()):
        params: dict[str, object] = {"k": k, "diversity": diversity}
        if genres:
            params["genres"] = ",".join(sorted(genres))
        if exclude:
            params["exclude_genres"] = ",".join(sorted(exclude))
        if lo is not None:
            params["year_min"] = lo
        if hi is not None:
            params["year_max"] = hi
        if banned:
            params["exclude_items"] = ",".join(map(str, sorted(banned)))
        answer = client.get(f"/recommend/{user}", params=params)
        filtered = len(params) > 2
    else:
        filters = {
            "genres": sorted(genres),
            "exclude_genres": sorted(exclude),
            "exclude_items": sorted(banned),
        }
        filters |= {"year_min": lo, "year_max": hi}
        answer = client.post(
            "/recommend",
            json={"history": profiles[user], "k": k, "filters": filters, "diversity": diversity},
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    passing = (
        {n for n, item in items.items() if _passes(item, genres, exclude, lo, hi)} - banned - seen
    )
    got = [i["item_id"] for i in body["items"]]
    assert set(got) <= passing
    assert len(got) == len(set(got)) == min(k, len(passing))
    assert body["passing"] == (len(passing) if filtered else None)  # None: no filter given
    assert (body["reason"] is not None) == (not passing)


def test_unknown_filter_names_are_refused_and_an_empty_filter_is_explained(
    served: tuple[TestClient, dict[int, tuple[set[str], int | None]], dict[str, list[int]]],
) -> None:
    client, _, profiles = served
    user = sorted(profiles)[0]
    typo = client.get(f"/recommend/{user}", params={"genre": "Comedy", "k": 5})
    assert typo.status_code == 422
    assert [f["loc"] for f in typo.json()["detail"]] == [["query", "genre"]]
    body = client.post("/recommend", json={"history": [1], "filters": {"genre": ["x"]}})
    assert body.status_code == 422 and ["body", "filters", "genre"] in [
        f["loc"] for f in body.json()["detail"]
    ]
    nothing = client.get(f"/recommend/{user}", params={"genres": "No such genre"})
    assert nothing.status_code == 200
    assert nothing.json()["items"] == [] and nothing.json()["passing"] == 0
    assert "no item passes the filters" in nothing.json()["reason"]
    unfiltered = client.get(f"/recommend/{user}").json()
    assert unfiltered["passing"] is None and unfiltered["reason"] is None


def test_a_user_with_nothing_to_go_on_gets_popular_items_that_pass_the_filters(
    served: tuple[TestClient, dict[int, tuple[set[str], int | None]], dict[str, list[int]]],
) -> None:
    client, items, _ = served
    answer = client.get("/recommend/nobody", params={"genres": "Classic", "k": 100}).json()
    classic = {n for n, (genres, _) in items.items() if "Classic" in genres}
    assert answer["fallback"] and answer["passing"] == len(classic)
    assert {i["item_id"] for i in answer["items"]} == classic  # k over what passes: all of them


def test_attributes_read_years_from_titles_and_filter_by_any_genre() -> None:
    attributes = Attributes(
        [(3, ["Drama"], "A (1995)"), (1, ["Comedy", "Drama"], "B (1980)"), (2, ["Horror"], "C")]
    )
    assert attributes.passing(ItemFilter()).ids.tolist() == [1, 2, 3]
    assert attributes.passing(ItemFilter(genres=frozenset({"Drama", "Horror"}))).ids.tolist() == [
        1,
        2,
        3,
    ]
    assert attributes.passing(ItemFilter(exclude_genres=frozenset({"Comedy"}))).ids.tolist() == [
        2,
        3,
    ]
    assert attributes.passing(ItemFilter(year_min=1981)).ids.tolist() == [3]  # 2 has no year
    assert attributes.passing(ItemFilter(year_max=1995)).ids.tolist() == [1, 3]
    assert (year_of("Toy Story (1995)"), year_of("Untitled")) == (1995, None)


def test_an_item_switched_off_is_in_no_answer_of_any_replica_until_switched_on(
    model: tuple[Settings, Catalogue, dict[str, list[int]]],
) -> None:
    """An item could not be switched off without a new model. Off (PATCH /items/{id}), it is
    in no answer of either replica, with or without filters, nor after a restart; on, it is
    back."""
    settings, items, profiles = model
    shared = {"redis_url": REDIS, "redis_prefix": f"test-switch-{uuid.uuid4().hex}"}
    replica = settings.model_copy(update=shared)
    user = sorted(profiles)[0]
    try:
        with (
            TestClient(create_app(replica, profiles=profiles), headers=READ) as a,
            TestClient(create_app(replica), headers=READ) as b,
        ):
            first = a.get(f"/recommend/{user}", params={"k": 5}).json()["items"][0]["item_id"]
            assert a.patch(f"/items/{first}", json={"available": False}).status_code == 401
            off = a.patch(f"/items/{first}", json={"available": False}, headers=ADMINISTER)
            assert off.status_code == 200 and off.json() == {"item_id": first, "available": False}
            genre = sorted(items[first][0])[0]
            for client in (a, b):
                _until(lambda c=client: first not in _ids(c, user))  # type: ignore[misc]
                assert first not in _ids(client, user, genres=genre)
                assert client.get(f"/items/{first}").json()["available"] is False
            with Redis.from_url(REDIS) as redis:  # Redis loses the switches: they are put back
                key = f"{shared['redis_prefix']}:items:off"
                redis.delete(key)
                _until(lambda: bool(redis.hexists(key, str(first))))
        with TestClient(create_app(replica), headers=READ) as restarted:
            assert first not in _ids(restarted, user) and first not in _ids(restarted, user, k=200)
            assert restarted.patch(
                f"/items/{first}", json={"available": True}, headers=ADMINISTER
            ).json()["available"]
            assert first in _ids(restarted, user)
            assert (
                restarted.patch(
                    "/items/999999", json={"available": False}, headers=ADMINISTER
                ).status_code
                == 404
            )
            assert (
                restarted.patch(
                    f"/items/{first}", json={"availabel": False}, headers=ADMINISTER
                ).status_code
                == 422
            )
    finally:
        with Redis.from_url(REDIS) as redis:
            for key in redis.scan_iter(f"{shared['redis_prefix']}:*"):
                redis.delete(key)


def _ids(client: TestClient, user: str, **params: object) -> list[int]:
    answer = client.get(f"/recommend/{user}", params={"k": 20, **params})
    assert answer.status_code == 200, answer.text
    return [i["item_id"] for i in answer.json()["items"]]


def _until(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.05)


def test_diversity_takes_the_best_item_first_then_trades_score_for_variety() -> None:
    """Two kinds of items: the ten best-scored are all of one kind. The ranking (0) keeps
    them; a re-rank for diversity brings the other kind in after the best item, and lowers
    the list's intra-list similarity."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    vectors = np.stack([a + 0.05 * rng.normal(size=8) for _ in range(10)] + [b] * 10)
    scores = np.concatenate([np.linspace(10, 9, 10), np.linspace(8, 7, 10)])
    plain = rerank(scores, vectors, 10, 0.0)
    assert plain.tolist() == list(range(10))
    varied = rerank(scores, vectors, 10, 0.5)
    assert varied[0] == 0 and (varied >= 10).any() and len(set(varied.tolist())) == 10
    assert intra_list_similarity(vectors[varied]) < intra_list_similarity(vectors[plain])


def test_switches_kept_in_a_file_hold_every_switch_made_at_once(tmp_path: Path) -> None:
    """A process that keeps added items in a folder keeps its switches in a file beside them:
    many switches answered at once are all in it when the process starts again."""

    async def switch_many() -> None:
        switches = FileSwitches(tmp_path / "off.json")
        await asyncio.gather(*(switches.switch(i, available=False) for i in range(1, 51)))
        await switches.switch(7, available=True)

    asyncio.run(switch_many())
    version, off = asyncio.run(FileSwitches(tmp_path / "off.json").off())
    assert (version, off) == (51, frozenset(range(1, 51)) - {7})
