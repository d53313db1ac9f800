"""The catalogue serves only image files inside the dataset folder, whatever items.csv says."""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.api.errors import install_errors
from service.api.routes import items
from service.api.security import Guards
from service.catalogue import load_catalogue, safe_image_path

PNG_ROWS = {
    1: "images/1.png",  # fine
    2: "../outside.png",  # a file next to the folder
    3: "/etc/passwd",  # absolute
    4: "images/escape.png",  # a symlink to the file outside
    5: "items.csv",  # inside, but not an image
    6: "images/missing.png",
    7: "images/./inner.png",  # a symlink that stays inside: fine
    8: "images/sub/../1.png",  # `..` is refused even when it would stay inside
    9: "",
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "images" / "1.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outside.png")
    (root / "images" / "escape.png").symlink_to(tmp_path / "outside.png")
    (root / "images" / "inner.png").symlink_to(root / "images" / "1.png")
    with (root / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres", "image"])
        for item, image in PNG_ROWS.items():
            w.writerow([item, f"title {item}", "x", image])
    return root


def test_only_images_inside_the_folder_are_kept(folder: Path) -> None:
    catalogue = load_catalogue(folder)
    assert sorted(catalogue.items) == sorted(PNG_ROWS)
    with_image = {i for i, item in catalogue.items.items() if item.image is not None}
    assert with_image == {1, 7}
    assert catalogue.items[1].image == (folder / "images" / "1.png").resolve()
    assert catalogue.items[7].image == (folder / "images" / "1.png").resolve()
    assert catalogue.items[1].title == "title 1"
    assert catalogue.items[1].media_type == "image/png"


@pytest.mark.parametrize(
    "relative",
    ["..", "../data/images/1.png", "images/../../outside.png", "/etc/passwd", "..\\outside.png"],
)
def test_escaping_paths_are_refused(folder: Path, relative: str) -> None:
    assert safe_image_path(folder, relative) is None


def test_no_folder_is_an_empty_catalogue() -> None:
    assert load_catalogue(None).items == {}


@pytest.fixture
def client(folder: Path) -> Iterator[TestClient]:
    """Just the page's routes, with the catalogue in the lifespan state as the service has it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"catalogue": load_catalogue(folder)}

    app = FastAPI(lifespan=lifespan)
    app.include_router(items.router(Guards.open()))  # no guards: the catalogue alone
    install_errors(app)
    with TestClient(app) as c:
        yield c


def test_an_item_image_is_served_with_its_type(client: TestClient, folder: Path) -> None:
    r = client.get("/items/1/image")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.content == (folder / "images" / "1.png").read_bytes()
    assert client.get("/items/1").json() == {
        "item_id": 1,
        "title": "title 1",
        "image_url": "/items/1/image",
        "genres": ["x"],  # from items.csv
        "year": None,  # the title has none
        "attributes": {},
        "added": False,  # not added while serving
        "available": True,  # nothing switched it off (an app of pages alone switches nothing)
    }


@pytest.mark.parametrize("item", [2, 3, 4, 5, 6, 8, 9, 10, 424242, -1])
def test_unsafe_unknown_or_missing_images_are_404(client: TestClient, item: int) -> None:
    r = client.get(f"/items/{item}/image")
    assert r.status_code == 404
    assert "image" not in r.headers["content-type"]


def test_an_item_without_image_has_no_image_url(client: TestClient) -> None:
    assert client.get("/items/2").json()["image_url"] is None
    assert client.get("/items/424242").status_code == 404
