"""A/B between registry versions, checked against a simulated population whose click model is
known.

The synthetic world's users each have a favourite kind (the most frequent in their history).
Shown an answer's first ``SHOWN`` items, a simulated user clicks each item of their favourite
kind with probability ``P_FAVOURITE`` and any other with ``P_OTHER``, independently; so every
impression has a known click probability, and an arm's expected CTR is their mean. Two
versions in a registry: the served ACF of the world (good) and a SASRec trained on the world's
interactions with the items shuffled (deliberately worse: it knows nothing of kinds). Two
``visrec-serve`` replicas follow the registry behind HAProxy (its third server slot points at
the second replica); all traffic goes through HAProxy: ``GET /recommend`` of a random user,
then ``POST /feedback`` with what was shown and clicked. Answers keep the items a user has seen
(``exclude_seen=false``): clicks become interactions, and without it users would run out of
unseen items of their kind, so the population would change from run to run.

``--runs`` experiments of each kind, each with a new experiment id (so a new draw of users):
**A/B** (A = worse, the control; B = good, 50/50): a pilot of ``--pilot`` visits, then the
visits the report asks for ("about N more impressions needed", if it cannot tell yet); then the
report's verdict must name B, and each arm's expected CTR must lie in its measured CTR's 95%
interval. **A/A** (both arms the good version), the same number of visits as the A/B run
before it: the report must not name a winner (allowed: 1 of 20). Printed: per run the visits,
the CTRs and the verdict; then the counts against the goals.

    .venv/bin/python -m benchmarks.ab_simulation [--runs 20] [--pilot 200]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import torch

from harness.processes import SERVE, free_port, wait_for
from harness.redis_servers import RedisServer
from service.abtest import arm_counts, stored_totals, verdicts, wilson
from service.model.checkpoint import save_checkpoint
from service.offline.training.config import TrainConfig
from service.offline.training.pipeline import fit, prepare, to_checkpoint
from service.registry import Experiment, Registry
from service.store.feedback import Totals

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = "/usr/sbin/haproxy"
PREFIX = "ab"
SHOWN = 5
P_FAVOURITE, P_OTHER = 0.30, 0.02
MAX_VISITS = 20_000  # a run that asks for more is reported, not run


def favourites(world: Path) -> tuple[dict[str, str], dict[int, str]]:
    """(user -> favourite kind, item -> kind)"""
    with (world / "items.csv").open() as f:
        kinds = {int(row["item_id"]): row["genres"] for row in csv.DictReader(f)}
    seen: dict[str, Counter[str]] = {}
    with (world / "interactions.csv").open() as f:
        for row in csv.DictReader(f):
            seen.setdefault(row["user_id"], Counter())[kinds[int(row["item_id"])]] += 1
    return {u: c.most_common(1)[0][0] for u, c in seen.items()}, kinds


def worse_model(world: Path, features: Path, folder: Path) -> Path:
    """A SASRec trained on the world's interactions with every item replaced at random."""
    shuffled = folder / "shuffled-world"
    shuffled.mkdir()
    shutil.copy(world / "items.csv", shuffled / "items.csv")
    (shuffled / "images").symlink_to((world / "images").resolve())
    rng = np.random.default_rng(0)
    with (world / "interactions.csv").open() as f:
        rows = list(csv.DictReader(f))
    items = [r["item_id"] for r in rows]
    rng.shuffle(items)
    with (shuffled / "interactions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user_id", "item_id", "timestamp"])
        w.writeheader()
        w.writerows({**r, "item_id": i} for r, i in zip(rows, items, strict=True))
    prepared = prepare(shuffled, features)
    config = replace(TrainConfig(), model="sasrec", dim=16, epochs=3)
    result = fit(prepared, config, device=torch.device("cpu"), progress=False)
    checkpoint = folder / "worse.pt"
    save_checkpoint(checkpoint, to_checkpoint(prepared, result, config))
    return checkpoint


class Population:
    def __init__(self, url: str, favourite: dict[str, str], kinds: dict[int, str], seed: int):
        self.client = httpx.Client(base_url=url, timeout=30)
        self.favourite, self.kinds = favourite, kinds
        self.users = sorted(favourite)
        self.rng = np.random.default_rng(seed)
        self.expected: dict[str, list[float]] = {}  # arm -> click probability per impression

    def visit(self) -> None:
        user = str(self.rng.choice(self.users))
        # seen items stay in the answers: clicks become interactions, and otherwise users run
        # out of unseen items of their kind on a small world, changing the population per run
        params = {"k": SHOWN, "exclude_seen": "false"}
        answer = self.client.get(f"/recommend/{user}", params=params).json()
        shown = [i["item_id"] for i in answer["items"]]
        p = [P_FAVOURITE if self.kinds[i] == self.favourite[user] else P_OTHER for i in shown]
        clicks = [i for i, q in zip(shown, p, strict=True) if self.rng.random() < q]
        self.expected.setdefault(answer["arm"], []).extend(p)
        body = {"request_id": answer["request_id"], "impressions": shown, "clicks": clicks}
        self.client.post("/feedback", json=body).raise_for_status()


def counts(url: str, experiment: Experiment) -> dict[str, Totals]:
    return arm_counts(experiment, stored_totals(url, PREFIX))


def run_experiment(
    registry: Registry,
    replicas: list[str],
    routed: list[float],
    arms: list[tuple[str, str]],
    visits: int,
    population: Population,
    redis_url: str,
) -> tuple[Experiment, int, dict[str, Totals]]:
    """Start an experiment, wait until every replica routes by it (adding how long that took
    to ``routed``), send ``visits`` (or, with visits < 0, a pilot of -visits and then what the
    report asks for)."""
    experiment = registry.start_experiment(arms, [50, 50])
    started = time.monotonic()
    for replica in replicas:  # each asked directly, as fast as one client can
        while not (httpx.get(f"{replica}/recommend/1").json()["arm"] or "").startswith(
            experiment.id
        ):
            assert time.monotonic() - started < 30, f"{replica} did not start the experiment"
    routed.append(time.monotonic() - started)
    population.expected = {}
    sent = 0
    target = abs(visits)
    while sent < target:
        population.visit()
        sent += 1
        if sent == target and visits < 0:
            (verdict,) = verdicts(experiment, counts(redis_url, experiment))
            more = verdict.more_impressions or 0
            if verdict.winner is None and more and sent + more // SHOWN <= MAX_VISITS:
                target += -(-more // SHOWN)
    return experiment, sent, counts(redis_url, experiment)


@dataclass
class Outcome:
    runs: int
    right: int = 0  # A/B runs whose verdict named B
    inside: int = 0  # arms whose expected CTR lay inside their measured 95% interval
    checked: int = 0
    aa_winners: int = 0  # A/A runs that named a winner
    routed: list[float] = field(default_factory=list)  # seconds until every replica routed

    def __str__(self) -> str:
        return (
            f"A/B: the better arm named in {self.right} of {self.runs} runs (goal: all); each "
            f"arm's expected CTR inside its measured 95% interval in {self.inside} of "
            f"{self.checked}; A/A: a winner named in {self.aa_winners} of {self.runs} runs "
            f"(goal: at most 1 of 20)\nevery replica routing by a new experiment after: median "
            f"{np.median(self.routed):.2f} s, max {max(self.routed):.2f} s "
            f"({len(self.routed)} starts)"
        )


def simulation(
    world: Path, features: Path, good: Path, work: Path, runs: int, pilot: int
) -> Outcome:
    """The whole check on ``world`` (its features, its good checkpoint), replicas started with
    ``--work-dir work``; scratch files in a folder of ``work`` removed after."""
    favourite, kinds = favourites(world)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        scratch = Path(folder)
        worse = worse_model(world, features, scratch)
        server = RedisServer(scratch, fsync="off")
        server.start()
        registry = Registry(scratch / "registry", server.url, PREFIX)
        g = registry.publish(good, features).version
        w = registry.store(worse, features)
        procs, lb, replicas = start(world, work, server.url, registry.root)
        try:
            population = Population(lb, favourite, kinds, seed=0)
            return simulate(registry, replicas, (w, g), population, server.url, runs, pilot)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pilot", type=int, default=200, help="visits before the first report")
    parser.add_argument("--work-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    from service.offline.bootstrap import prepare_serving

    dataset, features, good = prepare_serving(None, args.work_dir, torch.device("cpu"))
    print(simulation(dataset.root, features, good, args.work_dir, args.runs, args.pilot))


def start(
    world: Path, work: Path, redis_url: str, registry: Path
) -> tuple[list[subprocess.Popen[bytes]], str, list[str]]:
    env = {
        **os.environ,
        "VISREC_REDIS_URL": redis_url,
        "VISREC_REDIS_PREFIX": PREFIX,
        "VISREC_REGISTRY": str(registry),
        "VISREC_ENVIRONMENT": "development",
        "VISREC_RATE_LIMIT_PER_S": "0",
    }
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        command = [SERVE, str(world), "--work-dir", str(work), "--port", str(port)]
        command += ["--load-profiles"] if i == 0 else []
        procs.append(subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL))
        wait_for(f"http://127.0.0.1:{port}/readyz", procs, timeout_s=600)
    lb_port = free_port()
    replicas = [f"127.0.0.1:{p}" for p in ports]
    lb_env = {**os.environ, "LB_BIND": f"127.0.0.1:{lb_port}", "REPLICA_1": replicas[0],
              "REPLICA_2": replicas[1], "REPLICA_3": replicas[1]}  # fmt: skip
    procs.append(subprocess.Popen(
        [HAPROXY, "-db", "-f", str(ROOT / "docker" / "haproxy.cfg")], env=lb_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    lb = f"http://127.0.0.1:{lb_port}"
    wait_for(f"{lb}/healthz", procs)
    time.sleep(1.5)  # both replicas' health checks have passed
    return procs, lb, [f"http://{r}" for r in replicas]


def simulate(
    registry: Registry,
    replicas: list[str],
    versions: tuple[str, str],  # (worse, good)
    population: Population,
    redis_url: str,
    runs: int,
    pilot: int,
) -> Outcome:
    worse, good = versions
    out = Outcome(runs)
    for run in range(runs):
        population.rng = np.random.default_rng(run)
        arms = [("A", worse), ("B", good)]
        experiment, sent, got = run_experiment(
            registry, replicas, out.routed, arms, -pilot, population, redis_url
        )
        (verdict,) = verdicts(experiment, got)
        out.right += verdict.winner == "B"
        for arm in ("A", "B"):
            expected = float(np.mean(population.expected[experiment.label(arm)]))
            low, high = wilson(got[arm].clicks, got[arm].impressions)
            out.inside += low <= expected <= high
            out.checked += 1
        ctr = {a: got[a].clicks / got[a].impressions for a in ("A", "B")}
        print(f"A/B run {run}: {sent} visits, CTR A {ctr['A']:.4f} B {ctr['B']:.4f}: {verdict}")
        population.rng = np.random.default_rng(1000 + run)
        copies = [("A", good), ("B", good)]
        same, _, same_got = run_experiment(
            registry, replicas, out.routed, copies, sent, population, redis_url
        )
        (aa,) = verdicts(same, same_got)
        out.aa_winners += aa.winner is not None
        print(f"A/A run {run}: {sent} visits: {aa}")
    registry.stop_experiment()
    return out


if __name__ == "__main__":
    main()
