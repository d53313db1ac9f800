"""A/B between registry versions (issue 25): arms by a stable hash of the user, every process
routing alike, answers and feedback naming their arm, and the report's verdict."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from harness.redis_servers import REDIS, redis_prefix
from service.abtest import verdicts
from service.api.app import create_app
from service.config import Settings
from service.model.checkpoint import save_checkpoint
from service.offline.cli import main as visrec
from service.offline.data.synthetic import World
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.registry import Experiment, Registry, RegistryError
from service.store.feedback import Totals


@pytest.fixture(scope="module")
def versions(
    world: World, served_work_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, str, str]]:
    """A registry holding two versions (the served world's model and one trained with another
    seed), the first current."""
    run_dir = served_work_dir / world.root.resolve().name
    features = run_dir / "features-efficientnet_lite0"
    prepared = prepare(world.root, features)
    config = replace(TrainConfig(), dim=16, attention_dim=16, epochs=2, seed=1)
    other = tmp_path_factory.mktemp("model-b") / "acf.pt"
    fitted = fit(prepared, config, device=torch.device("cpu"), progress=False)
    save_checkpoint(other, to_checkpoint(prepared, fitted, config))
    with redis_prefix("experiments") as prefix:
        registry = Registry(tmp_path_factory.mktemp("registry"), REDIS, prefix)
        a = registry.publish(run_dir / "acf.pt", features).version
        b = registry.store(other, features)
        yield registry, a, b
        if registry.experiment() is not None:
            registry.stop_experiment()


def test_users_keep_their_arm_and_arms_get_their_share() -> None:
    experiment = Experiment("1234abcd", (("A", "v1"), ("B", "v2")), (90, 10), 0.0)
    arms = [experiment.arm_of(str(u)) for u in range(20_000)]
    assert 0.085 < Counter(arms)["B"] / len(arms) < 0.115
    again = Experiment.parse(experiment.dumps())  # as every process reads it
    assert again == experiment and [again.arm_of(str(u)) for u in range(20_000)] == arms
    other = replace(experiment, id="abcd1234")  # another experiment draws users afresh
    assert [other.arm_of(str(u)) for u in range(20_000)] != arms
    assert experiment.arm_of(None) == "A"  # an anonymous history: the control


def test_an_experiment_needs_known_versions_named_arms_and_a_whole_split(
    versions: tuple[Registry, str, str],
) -> None:
    registry, a, b = versions
    for arms, split in (
        ([("A", a), ("B", "0" * 12)], [50, 50]),  # no such version
        ([("A", a), ("A", b)], [50, 50]),  # one name twice
        ([("A", a), ("B b", b)], [50, 50]),  # a space in a name
        ([("A", a), ("B", b)], [90, 20]),  # not 100
        ([("A", a), ("B", b)], [100, 0]),  # an arm without users
        ([("A", a)], [100]),  # one arm
    ):
        with pytest.raises(RegistryError):
            registry.start_experiment(arms, split)
    assert registry.experiment() is None
    with pytest.raises(RegistryError):
        registry.stop_experiment()


def test_every_user_is_served_and_counted_by_their_arm_until_the_winner_is_promoted(
    versions: tuple[Registry, str, str],
    world: World,
    served_work_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry, a, b = versions
    where = ["--registry", str(registry.root), "--redis-url", REDIS]
    where += ["--redis-prefix", registry.keys.prefix]
    settings = Settings(
        registry=registry.root,
        redis_url=REDIS,
        redis_prefix=registry.keys.prefix,
        checkpoint=registry.files(a)[0],  # as the registry's current version is
        features=registry.files(a)[1],
        device="cpu",
    )
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        assert one.get("/recommend/1").json()["arm"] is None
        split = ["--split", "50/50"]
        assert (
            visrec(["experiment", "start", "--arm", f"A={a}", "--arm", f"B={b}", *split, *where])
            == 0
        )
        experiment = registry.experiment()
        assert experiment is not None
        deadline = time.monotonic() + 20
        while (
            one.get("/recommend/1").json()["arm"] is None
            or two.get("/recommend/1").json()["arm"] is None
        ):
            assert time.monotonic() < deadline, "a process never started the experiment"
            time.sleep(0.1)
        for user in map(str, range(40)):
            arm = experiment.arm_of(user)
            for replica in (one, two):  # the same arm, and its version, on every process
                body = replica.get(f"/recommend/{user}", params={"k": 5}).json()
                assert body["arm"] == f"{experiment.id}/{arm}"
                assert body["model_version"].endswith(a if arm == "A" else b)
            item = body["items"][0]["item_id"]
            why = one.get(f"/explain/{user}", params={"item_id": item}).json()  # the same model
            assert (why["arm"], why["model_version"]) == (body["arm"], body["model_version"])
            clicked = one.post(
                "/feedback", json={"request_id": body["request_id"], "clicks": [item]}
            )
            assert clicked.json()["arm"] == f"{experiment.id}/{arm}"
        counted = {t["arm"]: t for t in one.get("/feedback").json() if t["arm"]}
        arms = Counter(experiment.arm_of(str(u)) for u in range(40))
        for arm, users in arms.items():
            assert counted[f"{experiment.id}/{arm}"]["clicks"] == users
        assert visrec(["experiment", "report", *where]) == 0
        assert visrec(["experiment", "promote", "B", *where]) == 0
        assert registry.experiment() is None and registry.current().version == b  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while not all(
            (x := r.get("/recommend/3").json())["arm"] is None and x["model_version"].endswith(b)
            for r in (one, two)
        ):
            assert time.monotonic() < deadline, "a process kept the experiment after promote"
            time.sleep(0.1)
    out = capsys.readouterr().out
    assert f"experiment {experiment.id} started" in out
    assert f"{'A':<12} {arms['A']:>12,} {arms['A']:>9,}  1.0000" in out  # every shown one clicked
    assert "B − A: +0.0000" in out and "no difference seen" in out
    assert f"B's version {b} is current" in out


def _totals(impressions: int, clicks: int) -> Totals:
    return Totals(impressions, clicks)


def test_the_verdict_names_a_clear_winner_and_otherwise_says_how_much_more_is_needed() -> None:
    experiment = Experiment("e", (("A", "v1"), ("B", "v2")), (50, 50), 0.0)
    (clear,) = verdicts(experiment, {"A": _totals(20_000, 2_000), "B": _totals(20_000, 2_600)})
    d, low, high = clear.difference
    assert clear.winner == "B" and 0 < low < d < high and d == pytest.approx(0.03)
    assert str(clear).startswith("B ahead of A by 0.0300 CTR")
    (worse,) = verdicts(experiment, {"A": _totals(20_000, 2_600), "B": _totals(20_000, 2_000)})
    assert worse.winner == "A"
    (unsure,) = verdicts(experiment, {"A": _totals(500, 50), "B": _totals(500, 60)})
    assert unsure.winner is None and unsure.more_impressions is not None
    # a difference of 0.02 at rates near 0.1 needs ~5,700 impressions an arm at 99% / 80%
    assert 10_000 < unsure.more_impressions + 1_000 < 16_000
    assert "cannot tell yet: about" in str(unsure)
    (empty,) = verdicts(experiment, {"A": _totals(100, 10)})
    assert empty.winner is None and "no difference seen" in str(empty)
