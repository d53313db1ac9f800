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
from service.filters import Attributes, ItemFilter, Row, UnknownAttributesError, named, year_of
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.store.patches import FileTable

CONFIG = TrainConfig(dim=16, attention_dim=16, epochs=3, batch_size=128, lr=1e-2)
READER, ADMIN = "read-key-0123456789abcdef", "admin-key-0123456789abcdef"
READ, ADMINISTER = {"X-API-Key": READER}, {"X-API-Key": ADMIN}
REDIS = "redis://127.0.0.1:6379/0"


Item = tuple[set[str], int | None, set[str]]  # genres, year, colours
Catalogue = dict[int, Item]
COLOURS = ("red", "green", "blue")
# What the served app's items are PATCHed to before the tests read it: (changes, what they
# make of the item's genres, year and colours given its own)
CHANGED = {
    3: {"genres": ["Classic"], "attributes": {"colour": ["green", "red"]}},
    10: {"year": 2014, "attributes": {"colour": []}},
    14: {"year": None, "genres": None},  # back to its own: no change
    21: {"attributes": {"colour": ["blue"]}, "year": 1961},
}


def _catalogue(world: World, folder: Path) -> Catalogue:
    """The world's items.csv with a year in most titles, a second genre on some and a colour
    column (none, one or two colours): (genres, year, colours) of each item."""
    folder.mkdir(exist_ok=True)
    rows = list(csv.DictReader((world.root / "items.csv").open()))
    out = {}
    with (folder / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres", "image", "colour"])
        for row in rows:
            n = int(row["item_id"])
            year = None if n % 7 == 0 else 1970 + n % 40
            title = row["title"] + ("" if year is None else f" ({year})")
            genres = {row["genres"], *(["Classic"] if n % 5 == 0 else [])}
            colours = {COLOURS[n % 3], *([COLOURS[n % 2]] if n % 4 == 0 else [])} - {
                *(["red"] if n % 11 == 0 else [])
            }
            w.writerow([n, title, "|".join(sorted(genres)), "", "|".join(sorted(colours))])
            out[n] = (genres, year, colours)
    return out


def _changed(items: Catalogue) -> Catalogue:
    """``items`` as CHANGED makes them."""
    out = dict(items)
    for n, change in CHANGED.items():
        genres, year, colours = items[n]
        if change.get("genres") is not None:
            genres = set(change["genres"])  # type: ignore[arg-type]
        if change.get("year") is not None:
            year = change["year"]  # type: ignore[assignment]
        colours = set(change.get("attributes", {}).get("colour", colours))  # type: ignore[union-attr]
        out[n] = (genres, year, colours)
    return out


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
    """The app with CHANGED applied, and the catalogue as it makes it."""
    settings, items, profiles = model
    with TestClient(create_app(settings, profiles=profiles), headers=READ) as client:
        for n, change in CHANGED.items():
            answer = client.patch(f"/items/{n}", json=change, headers=ADMINISTER)
            assert answer.status_code == 200, answer.text
        yield client, _changed(items), profiles


def _passes(
    item: Item,
    genres: set[str],
    exclude: set[str],
    lo: int | None,
    hi: int | None,
    colours: set[str] = set(),  # noqa: B006 (read only)
    no_colours: set[str] = set(),  # noqa: B006
) -> bool:
    have, year, coloured = item
    if (genres and not have & genres) or have & exclude:
        return False
    if (colours and not coloured & colours) or coloured & no_colours:
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
    names = sorted({g for genres, _, _ in items.values() for g in genres})
    genres = set(data.draw(st.lists(st.sampled_from(names), max_size=3)))
    exclude = set(data.draw(st.lists(st.sampled_from(names), max_size=2)))
    colours = set(data.draw(st.lists(st.sampled_from(COLOURS), max_size=2)))
    no_colours = set(data.draw(st.lists(st.sampled_from(COLOURS), max_size=1)))
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
        if colours:
            params["attribute"] = "colour:" + ",".join(sorted(colours))
        if no_colours:
            params["exclude_attribute"] = "colour:" + ",".join(sorted(no_colours))
        answer = client.get(f"/recommend/{user}", params=params)
        filtered = len(params) > 2
    else:
        filters = {
            "genres": sorted(genres),
            "exclude_genres": sorted(exclude),
            "exclude_items": sorted(banned),
            "attributes": {"colour": sorted(colours)} if colours else {},
            "exclude_attributes": {"colour": sorted(no_colours)} if no_colours else {},
        }
        filters |= {"year_min": lo, "year_max": hi}
        answer = client.post(
            "/recommend",
            json={"history": profiles[user], "k": k, "filters": filters, "diversity": diversity},
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    passing = {
        n
        for n, item in items.items()
        if _passes(item, genres, exclude, lo, hi, colours, no_colours)
    }
    passing -= banned | seen
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
    unknown = {"attributes": {"colour": ["red"], "size": ["L"]}, "exclude_attributes": {"x": ["1"]}}
    body = client.post("/recommend", json={"history": [1], "filters": unknown})
    assert body.status_code == 422 and body.json()["code"] == "unknown_attributes"
    assert body.json()["unknown_attributes"] == ["size", "x"]
    assert body.json()["known_attributes"] == ["colour", "genres"]
    query = client.get(f"/recommend/{user}", params={"attribute": ["colour:red", "size:L"]})
    assert query.status_code == 422 and query.json()["unknown_attributes"] == ["size"]
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
    classic = {n for n, (genres, _, _) in items.items() if "Classic" in genres}
    assert answer["fallback"] and answer["passing"] == len(classic)
    assert {i["item_id"] for i in answer["items"]} == classic  # k over what passes: all of them


def _row(n: int, genres: set[str], title: str, **others: set[str]) -> Row:
    return Row(
        n,
        {"genres": frozenset(genres)} | {k: frozenset(v) for k, v in others.items()},
        year_of(title),
    )


def test_attributes_read_years_from_titles_and_filter_by_any_genre() -> None:
    attributes = Attributes(
        [
            _row(3, {"Drama"}, "A (1995)", colour={"red"}),
            _row(1, {"Comedy", "Drama"}, "B (1980)", colour={"red", "blue"}),
            _row(2, {"Horror"}, "C"),
        ]
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
    blue = ItemFilter(having=named({"colour": {"blue", "green"}}))
    assert attributes.passing(blue).ids.tolist() == [1]
    not_red = ItemFilter(lacking=named({"colour": {"red"}}))
    assert attributes.passing(not_red).ids.tolist() == [2]
    assert attributes.names == {"genres", "colour"}
    # PATCH's changes overlaid: item 3 turns blue and gets a year, 2 gets a new attribute
    changed = attributes.changed({3: {"colour": ("blue",), "year": 1970}, 2: {"size": ("L",)}})
    assert changed.passing(blue).ids.tolist() == [1, 3]
    assert changed.passing(not_red).ids.tolist() == [2, 3]
    assert changed.passing(ItemFilter(year_max=1975)).ids.tolist() == [3]
    assert changed.names == {"genres", "colour", "size"}
    assert attributes.passing(blue).ids.tolist() == [1]  # the catalogue's own are untouched
    with pytest.raises(UnknownAttributesError, match="'size'"):
        attributes.passing(ItemFilter(lacking=named({"size": {"L"}})))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_items_added_to_the_columns_filter_as_if_built_with_them(data: st.DataObject) -> None:
    """Items added while serving are merged into the columns, not built again: every filter
    then keeps what it keeps of the same items built at once."""
    colours = st.sets(st.sampled_from(["red", "blue", "green"]), max_size=2)
    genres = st.sets(st.sampled_from(["Drama", "Comedy"]), max_size=2)
    titles = st.sampled_from(["A", "A (1990)", "A (2001)"])
    ids = data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=25, unique=True))
    rows = [_row(n, data.draw(genres), data.draw(titles), colour=data.draw(colours)) for n in ids]
    cut = data.draw(st.integers(1, len(rows)))
    merged = Attributes(rows[:cut]).added(rows[cut:])
    whole = Attributes(rows)
    for _ in range(5):
        spec = ItemFilter(
            genres=frozenset(data.draw(genres)),
            year_min=data.draw(st.none() | st.sampled_from([1985, 1995])),
            having=named({"colour": data.draw(colours)}) if data.draw(st.booleans()) else (),
            lacking=named({"colour": data.draw(colours)}) if data.draw(st.booleans()) else (),
        )
        try:
            expected = whole.passing(spec).ids.tolist()
        except UnknownAttributesError:  # no item has a colour
            continue
        assert (
            merged.passing(spec).ids.tolist()
            == expected
            == sorted(r.item_id for r in rows if spec.accepts(r.values, r.year))
        )


def test_an_item_switched_off_is_in_no_answer_of_any_replica_until_switched_on(
    model: tuple[Settings, Catalogue, dict[str, list[int]]],
) -> None:
    """An item could not be switched off without a new model. Off (PATCH /items/{id}), it is
    in no answer of either replica, with or without filters, nor after a restart; on, it is
    back. Attributes changed by PATCH are what every replica's filters read, after a restart
    too, until set back to the item's own."""
    settings, items, profiles = model
    shared = {"redis_url": REDIS, "redis_prefix": f"test-switch-{uuid.uuid4().hex}"}
    replica = settings.model_copy(update=shared)
    user = sorted(profiles)[0]
    try:
        with (
            TestClient(create_app(replica, profiles=profiles), headers=READ) as a,
            TestClient(create_app(replica), headers=READ) as b,
        ):
            top = [
                i["item_id"] for i in a.get(f"/recommend/{user}", params={"k": 5}).json()["items"]
            ]
            first, second = top[:2]
            assert a.patch(f"/items/{first}", json={"available": False}).status_code == 401
            off = a.patch(f"/items/{first}", json={"available": False}, headers=ADMINISTER)
            assert off.status_code == 200
            assert off.json()["item_id"] == first and off.json()["available"] is False
            genre = sorted(items[first][0])[0]
            violet = {"attributes": {"colour": ["violet"]}, "genres": ["Noir"], "year": 1899}
            changed = a.patch(f"/items/{second}", json=violet, headers=ADMINISTER)
            assert changed.status_code == 200, changed.text
            assert changed.json() == {
                "item_id": second,
                "available": True,
                "genres": ["Noir"],
                "year": 1899,
                "attributes": {"colour": ["violet"]},
            }
            for client in (a, b):
                _until(lambda c=client: first not in _ids(c, user))  # type: ignore[misc]
                assert first not in _ids(client, user, genres=genre)
                assert client.get(f"/items/{first}").json()["available"] is False
                _until(lambda c=client: _ids(c, user, **VIOLET) == [second])  # type: ignore[misc]
                assert _ids(client, user, genres="Noir", year_max=1900, exclude_seen=False) == [
                    second
                ]
            with Redis.from_url(REDIS) as redis:  # Redis loses the tables: they are put back
                key = f"{shared['redis_prefix']}:items:off"
                changes = f"{shared['redis_prefix']}:items:changes"
                redis.delete(key, changes)
                _until(lambda: bool(redis.hexists(key, str(first))))
                _until(lambda: bool(redis.hexists(changes, f"{second}:colour")))
        with TestClient(create_app(replica), headers=READ) as restarted:
            assert first not in _ids(restarted, user) and first not in _ids(restarted, user, k=200)
            assert restarted.patch(
                f"/items/{first}", json={"available": True}, headers=ADMINISTER
            ).json()["available"]
            assert first in _ids(restarted, user)
            assert _ids(restarted, user, **VIOLET) == [second]  # the changes outlive it too
            back = {"attributes": {"colour": None}, "genres": None, "year": None}
            own = restarted.patch(f"/items/{second}", json=back, headers=ADMINISTER).json()
            colours = sorted(items[second][2])
            assert own["attributes"] == ({"colour": colours} if colours else {})
            assert (set(own["genres"]), own["year"]) == items[second][:2]
            assert _ids(restarted, user, **VIOLET) == []
            assert (
                restarted.patch(f"/items/{first}", json={}, headers=ADMINISTER).status_code == 422
            )  # nothing to change
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


VIOLET = {"attribute": "colour:violet", "exclude_seen": False}  # a colour no item has of its own


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
        switches = FileTable(tmp_path / "off.json")
        await asyncio.gather(*(switches.put({str(i): "1"}) for i in range(1, 51)))
        await switches.put({"7": None})

    asyncio.run(switch_many())
    version, off = asyncio.run(FileTable(tmp_path / "off.json").read())
    assert (version, set(off)) == (51, {str(i) for i in range(1, 51)} - {"7"})


def test_a_file_of_switches_from_before_tables_reads_as_the_items_switched_off(
    tmp_path: Path,
) -> None:
    """Switches kept in a file by the version before (``{"version", "off"}``) are not lost."""
    (tmp_path / "switched-off.json").write_text('{"version": 4, "off": [3, 9]}')
    table = FileTable(tmp_path / "switched-off.json")
    assert asyncio.run(table.read()) == (4, {"3": "1", "9": "1"})
    asyncio.run(table.put({"9": None}))
    assert asyncio.run(FileTable(tmp_path / "switched-off.json").read()) == (5, {"3": "1"})
