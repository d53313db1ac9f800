"""The probe that says whether a world can tell attention from a mean reads what is there."""

from __future__ import annotations

import torch

from benchmarks.pooling_probe import probe_accuracy


def test_a_readable_kind_is_read_and_an_unreadable_one_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    noise = torch.randn(400, 16, generator=gen)
    readable = noise + 4.0 * torch.nn.functional.one_hot(y, 16).float()  # kind in 4 dims
    assert probe_accuracy(readable, y, torch.Generator().manual_seed(1)) > 0.95
    chance = probe_accuracy(noise, y, torch.Generator().manual_seed(1))
    assert chance < 0.45  # 0.25 expected: held-out rows are never fitted
