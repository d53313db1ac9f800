"""A small synthetic visual world with a known answer.

Items are generated images: one shape (its *kind*) in a random colour at a random place on a
textured background. Each user prefers one kind: most of their interactions are items of that
kind, the rest are random. A good model therefore recommends a user's kind, and its component
attention should sit on the object rather than the background.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class WorldSpec:
    n_users: int = 60
    n_items: int = 80
    interactions_per_user: int = 20
    taste: float = 0.9  # share of a user's interactions that are of their favourite kind
    image_size: int = 112
    seed: int = 0


@dataclass(frozen=True)
class World:
    root: Path
    item_kinds: np.ndarray  # (N,) index into KINDS, for item ids 1..N
    user_kinds: np.ndarray  # (U,) favourite kind of user ids 0..U-1
    object_boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 of the object, in pixels


def make_world(root: Path, spec: WorldSpec = WorldSpec()) -> World:
    """Write ``items.csv``, ``interactions.csv`` and ``images/`` into ``root``."""
    rng = np.random.default_rng(spec.seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    item_kinds = np.arange(spec.n_items) % len(KINDS)
    rng.shuffle(item_kinds)
    boxes = np.stack(
        [
            _draw_item(root / "images" / f"{i + 1}.png", int(k), spec.image_size, rng)
            for i, k in enumerate(item_kinds)
        ]
    )
    user_kinds = rng.integers(0, len(KINDS), size=spec.n_users)
    with (root / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres", "image"])
        for i, k in enumerate(item_kinds):
            w.writerow([i + 1, f"{KINDS[k]} #{i + 1}", KINDS[k], f"images/{i + 1}.png"])
    with (root / "interactions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u, kind in enumerate(user_kinds):
            for t, item in enumerate(_history(item_kinds, int(kind), spec, rng)):
                w.writerow([u, item, 1_000_000 + 60 * t])
    return World(root, item_kinds, user_kinds, boxes)


def _history(
    item_kinds: np.ndarray, kind: int, spec: WorldSpec, rng: np.random.Generator
) -> list[int]:
    liked = np.flatnonzero(item_kinds == kind) + 1
    others = np.flatnonzero(item_kinds != kind) + 1
    n_liked = min(round(spec.interactions_per_user * spec.taste), len(liked))
    n_other = min(spec.interactions_per_user - n_liked, len(others))
    items = np.concatenate(
        [rng.choice(liked, n_liked, replace=False), rng.choice(others, n_other, replace=False)]
    )
    rng.shuffle(items)
    return items.tolist()


def _draw_item(path: Path, kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one item; returns the object's bounding box."""
    background = rng.integers(40, 216, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    side = int(rng.integers(size // 3, size // 2))
    x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    colour = tuple(int(c) for c in (255 - background + rng.integers(-30, 30, size=3)).clip(0, 255))
    draw = ImageDraw.Draw(img)
    if KINDS[kind] == "circle":
        draw.ellipse(box, fill=colour)
    elif KINDS[kind] == "square":
        draw.rectangle(box, fill=colour)
    elif KINDS[kind] == "triangle":
        draw.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=colour)
    else:
        bar = side // 3
        draw.rectangle((x0 + bar, y0, x0 + 2 * bar, y0 + side), fill=colour)
        draw.rectangle((x0, y0 + bar, x0 + side, y0 + 2 * bar), fill=colour)
    img.save(path)
    return np.array(box)
