"""The A/B report against a simulated population with a known click model (issue 25), at a
small size: 2 replicas behind HAProxy following a registry, all traffic through HAProxy
(``benchmarks/ab_simulation.py`` at full size: ``make bench-ab``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.ab_simulation import simulation
from service.offline.data.synthetic import World


def test_the_report_names_the_better_arm_and_no_winner_between_copies(
    world: World, world_features: tuple[Path, np.ndarray], served_work_dir: Path
) -> None:
    run_dir = served_work_dir / world.root.resolve().name
    # two runs of each kind: the full size is `make bench-ab`'s
    out = simulation(world.root, world_features[0], run_dir / "acf.pt", served_work_dir, 2, 100)
    assert out.right == 2  # the world's ACF against a SASRec that never saw a kind
    assert out.aa_winners <= 1  # at 99%, two copies of one version are rarely told apart
    assert out.inside >= out.checked - 1  # the click model's CTRs inside their 95% intervals
    assert len(out.routed) == 4 and max(out.routed) < 5  # every replica, within seconds
