"""The explanation page in a real browser: a uvicorn server on the synthetic world, opened in
Debian's headless Chromium through chromedriver. Saves screenshots to test-artifacts/."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from service.api.app import create_app
from service.config import Settings
from service.model.checkpoint import save_checkpoint
from service.offline.bootstrap import histories
from service.offline.data.dataset import load_dataset
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CONFIG = TrainConfig(dim=16, attention_dim=16, epochs=6, batch_size=128, lr=1e-2)
USER = "7"
# Everything the test reads off the page, in one round trip; numbers are the ones shown.
PAGE = """
const all = (sel, root = document) => [...root.querySelectorAll(sel)];
const ids = (sel) => all(sel).map((e) => Number(e.dataset.itemId));
const number = (e) => parseFloat(e.textContent.split(" ").pop());
const rect = (e) => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
return {
  busy: document.body.dataset.busy,
  status: document.getElementById("status").textContent,
  url: location.href,
  target: Number(document.getElementById("target").dataset.itemId),
  targetText: document.getElementById("target").textContent,
  profile: ids("#profile .profile-item"),
  attention: all("#profile .attention").map(number),
  heatmaps: all("#profile .profile-item").map((card) => ({
    opacity: all(".heatmap .cell", card).map((c) => parseFloat(getComputedStyle(c).opacity)),
    heatmap: rect(card.querySelector(".heatmap")),
    image: rect(card.querySelector("img")),
  })),
  recs: ids("#recommendations .rec"),
  scores: all("#recommendations .score").map(number),
  popularity: all("#recommendations .popularity").map(number),
  selected: ids("#recommendations .rec.selected"),
  images: all("img").map((i) => ({ src: i.src, loaded: i.complete && i.naturalWidth > 0 })),
};
"""


@pytest.fixture(scope="module")
def settings(
    world: World, world_features: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    prepared = prepare(world.root, world_features[0])
    result = fit(prepared, CONFIG, device=torch.device("cpu"), progress=False)
    ckpt = tmp_path_factory.mktemp("ui") / "acf.pt"
    save_checkpoint(ckpt, to_checkpoint(prepared, result, CONFIG))
    return Settings(checkpoint=ckpt, features=world_features[0], device="cpu", data=world.root)


@pytest.fixture(scope="module")
def server(settings: Settings, world: World) -> Iterator[str]:
    """The service on a free loopback port, in a thread; its base URL."""
    yield from serve(create_app(settings, profiles=histories(load_dataset(world.root))))


KEY = "ui-key-0123456789abcdefghij"


@pytest.fixture(scope="module")
def locked_server(settings: Settings, world: World) -> Iterator[str]:
    """The same with reads behind an API key, as in production with VISREC_AUTH_READS."""
    locked = settings.model_copy(
        update={"environment": "production", "api_keys": KEY, "auth_reads": True}
    )
    yield from serve(create_app(locked, profiles=histories(load_dataset(world.root))))


def serve(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"the browser test needs Debian's chromium and chromium-driver; missing: {missing}. "
            "Install them with `apt-get install -y chromium chromium-driver` (.ci/run does)."
        )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1300")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_docs_load_without_the_network(server: str) -> None:
    """/docs was a blank page without internet: Swagger UI came from a CDN. A browser whose
    every host but this machine fails to resolve must still show every operation."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(f"{server}/docs")
        operations = len(
            [
                op
                for ops in httpx.get(f"{server}/openapi.json").json()["paths"].values()
                for op in ops
            ]
        )

        def shown(d: webdriver.Chrome) -> int:
            return len(d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) or 0

        WebDriverWait(driver, 30, poll_frequency=0.1).until(lambda d: shown(d) >= operations)
        assert shown(driver) == operations
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name);"
        )
        assert loaded and all(url.startswith(server) for url in loaded), loaded
        driver.save_screenshot(str(ARTIFACTS / "docs-offline.png"))
    finally:
        driver.quit()


def _page(browser: webdriver.Chrome) -> dict[str, Any]:
    state: dict[str, Any] = browser.execute_script(PAGE)
    return state


def _settled(browser: webdriver.Chrome, done: Any, what: str) -> dict[str, Any]:
    """Wait until the page is idle, every image has loaded and ``done(page)`` holds."""

    def ready(driver: webdriver.Chrome) -> dict[str, Any] | None:
        page = _page(driver)
        idle = page["busy"] == "false" and all(i["loaded"] for i in page["images"])
        return page if idle and done(page) else None

    try:
        page: dict[str, Any] = WebDriverWait(browser, 30, poll_frequency=0.1).until(ready)
    except Exception as exc:
        raise AssertionError(f"page never showed {what}; last state: {_page(browser)}") from exc
    return page


def _check_against_api(page: dict[str, Any], api: httpx.Client, target: int) -> None:
    """The page shows what the JSON API says: profile, both attentions, recommendations."""
    why = api.get(f"/explain/{USER}", params={"item_id": target}).json()
    recs = api.get(f"/recommend/{USER}", params={"k": 10}).json()["items"]
    assert page["status"] == ""
    assert page["target"] == target
    assert f"score {why['score']:.3f}" in page["targetText"]
    assert page["profile"] == [p["item_id"] for p in why["profile"]]
    assert page["attention"] == pytest.approx([p["attention"] for p in why["profile"]], abs=1e-3)
    for shown, p in zip(page["heatmaps"], why["profile"], strict=True):
        weights = np.ravel(p["components"])  # row by row, as the CSS grid fills its cells
        assert shown["opacity"] == pytest.approx(0.75 * weights / weights.max(), abs=2e-3)
        assert shown["heatmap"] == pytest.approx(shown["image"], abs=1)  # covers the image
        assert shown["image"][2] > 50  # drawn at a visible size
    assert page["recs"] == [r["item_id"] for r in recs]
    assert page["scores"] == pytest.approx([r["score"] for r in recs], abs=1e-3)
    assert page["selected"] == ([target] if target in page["recs"] else [])
    srcs = {i["src"].removeprefix(str(api.base_url)) for i in page["images"]}
    assert {f"/items/{i}/image" for i in page["profile"] + page["recs"]} <= srcs


def test_the_page_explains_and_follows_new_interactions(
    server: str, browser: webdriver.Chrome
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    api = httpx.Client(base_url=server)
    browser.get(f"{server}/ui/users/{USER}")
    page = _settled(browser, lambda p: len(p["profile"]) == 9 and len(p["recs"]) == 10, "items")
    assert len(page["images"]) == 9 + 10 + 1  # profile, recommendations, the explained item
    assert all(len(h["opacity"]) == 49 for h in page["heatmaps"])
    _check_against_api(page, api, target=page["recs"][0])  # by default: the top one
    browser.save_screenshot(str(ARTIFACTS / "ui.png"))

    clicked = page["recs"][2]
    browser.find_elements(By.CSS_SELECTOR, "#recommendations .rec")[2].click()
    page = _settled(browser, lambda p: p["target"] == clicked, f"the explanation of {clicked}")
    assert page["url"].endswith(f"?item_id={clicked}")
    _check_against_api(page, api, target=clicked)

    before = page
    added = page["recs"][1]
    field = browser.find_element(By.CSS_SELECTOR, "#add-interaction input[name=item_id]")
    field.send_keys(str(added))
    browser.find_element(By.CSS_SELECTOR, "#add-interaction button").click()
    page = _settled(browser, lambda p: p["profile"][-1:] == [added], f"item {added} added")
    assert page["profile"] == [*before["profile"][1:], added]  # the oldest one made room
    assert added not in page["recs"]  # seen now
    assert len(page["heatmaps"][-1]["opacity"]) == 49
    assert sum(page["attention"]) == pytest.approx(1, abs=5e-3)
    _check_against_api(page, api, target=clicked)  # still the item chosen by the click
    browser.save_screenshot(str(ARTIFACTS / "ui-after-adding.png"))


def test_a_page_that_needs_a_key_asks_for_one_and_sends_it(
    locked_server: str, browser: webdriver.Chrome
) -> None:
    """The page and its images ignored VISREC_AUTH_READS, and its form got 401 for want of a
    key. Now titles and images are guarded reads, and the page asks for a key and sends it."""
    for path in ("/items/1", "/items/1/image", f"/recommend/{USER}"):
        assert httpx.get(f"{locked_server}{path}").status_code == 401, path
        assert httpx.get(f"{locked_server}{path}", headers={"X-API-Key": KEY}).is_success
    browser.get(f"{locked_server}/ui/users/{USER}")
    _settled(browser, lambda p: "enter an API key" in p["status"], "a request for a key")
    field = browser.find_element(By.CSS_SELECTOR, "#api-key input[name=key]")
    field.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#api-key button").click()
    page = _settled(browser, lambda p: len(p["recs"]) == 10, "the page, with the key")
    assert page["status"] == ""
    assert len(page["images"]) == 9 + 10 + 1
    assert all(i["src"].startswith("blob:") for i in page["images"])  # fetched with the key
    added = page["recs"][-1]
    browser.find_element(By.CSS_SELECTOR, "#add-interaction input[name=item_id]").send_keys(
        str(added)
    )
    browser.find_element(By.CSS_SELECTOR, "#add-interaction button").click()
    page = _settled(browser, lambda p: p["profile"][-1:] == [added], f"item {added} added")
    assert page["status"] == ""


def test_an_unknown_item_is_refused_on_the_page(server: str, browser: webdriver.Chrome) -> None:
    browser.get(f"{server}/ui/users/someone-new")
    popular = _settled(browser, lambda p: len(p["recs"]) == 10, "popular items")
    # Popular items show how many users chose them, not a "score" next to the model's score.
    assert popular["scores"] == []
    assert len(popular["popularity"]) == 10
    assert popular["popularity"] == sorted(popular["popularity"], reverse=True)
    browser.find_element(By.CSS_SELECTOR, "#add-interaction input[name=item_id]").send_keys("9999")
    browser.find_element(By.CSS_SELECTOR, "#add-interaction button").click()
    page = _settled(browser, lambda p: "9999" in p["status"], "an error")
    assert page["profile"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/items/..%2f..%2f..%2f..%2fetc%2fpasswd/image",
        "/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image",
        "/items/../../../../etc/passwd",
        "/items/1/../../../../etc/passwd",
        "/items/424242/image",
        "/items/1.5/image",
        "/ui/static/..%2f..%2f..%2fconfig.py",
        "/ui/static/../../../../etc/passwd",
        "/ui/static/%2e%2e/app.py",
    ],
)
def test_no_path_leaves_the_dataset_folder(server: str, path: str) -> None:
    """Raw request lines, so that no client normalises the path first."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    assert 400 <= r.status < 500
    assert b"root:" not in body
    assert b"import" not in body


def test_the_page_shows_a_filtered_list_and_keeps_its_filter(
    server: str, browser: webdriver.Chrome
) -> None:
    """Filters in the page's URL go with its /recommend, so a catalogue owner sees the list a
    category page would get; clicking an item keeps them."""
    api = httpx.Client(base_url=server)
    unfiltered = api.get(f"/recommend/{USER}", params={"k": 10}).json()["items"]
    genres = {r["item_id"]: api.get(f"/items/{r['item_id']}").json()["genres"] for r in unfiltered}
    top_genre = genres[unfiltered[0]["item_id"]][0]
    other = next(
        g for i in range(1, 200) for g in api.get(f"/items/{i}").json()["genres"] if g != top_genre
    )
    expected = api.get(f"/recommend/{USER}", params={"k": 10, "genres": other}).json()
    browser.get(f"{server}/ui/users/{USER}?genres={other}")
    page = _settled(browser, lambda p: len(p["recs"]) == len(expected["items"]) > 0, "the list")
    assert page["recs"] == [r["item_id"] for r in expected["items"]]
    assert all(other in api.get(f"/items/{i}").json()["genres"] for i in page["recs"])
    assert (
        f"{expected['passing']} items pass" in browser.find_element(By.ID, "recommendations").text
    )
    browser.find_elements(By.CSS_SELECTOR, "#recommendations .rec")[1].click()
    clicked = page["recs"][1]
    page = _settled(browser, lambda p: p["target"] == clicked, f"the explanation of {clicked}")
    assert f"genres={other}" in page["url"] and f"item_id={clicked}" in page["url"]
    assert page["recs"] == [r["item_id"] for r in expected["items"]]


def test_the_experiments_page_shows_what_post_feedback_counted(
    locked_server: str, browser: webdriver.Chrome
) -> None:
    api = httpx.Client(base_url=locked_server, headers={"X-API-Key": KEY})
    answer = api.get("/recommend/3", params={"k": 10}).json()
    shown = [i["item_id"] for i in answer["items"]]
    body = {"request_id": answer["request_id"], "impressions": shown[:6], "clicks": [shown[1]]}
    assert api.post("/feedback", json=body).status_code == 200
    (expected,) = [
        t for t in api.get("/feedback").json() if t["model_version"] == answer["model_version"]
    ]

    browser.get(f"{locked_server}/ui/experiments")
    browser.execute_script("sessionStorage.clear()")  # a key an earlier test gave this origin
    browser.refresh()
    WebDriverWait(browser, 20).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "false"
    )
    assert "API key" in browser.find_element(By.ID, "status").text  # reads need the key
    browser.find_element(By.CSS_SELECTOR, "#api-key input[name=key]").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#api-key button").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#totals tbody tr"))
    row = browser.find_element(By.CSS_SELECTOR, "#totals tbody tr")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    low, high = expected["ctr_95"]
    assert cells[:5] == [
        answer["model_version"],
        "none",
        f"{expected['impressions']:,}",
        f"{expected['clicks']:,}",
        f"{expected['ctr']:.4f} [{low:.4f}, {high:.4f}]",
    ]
    assert cells[5].split()[1] == str(expected["clicks_by_rank"]["2"])  # the click at rank 2
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-experiments.png"))
