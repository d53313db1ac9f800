"""A small synthetic visual world with a known answer.

Items are generated images: one shape (its *kind*) in a random colour, at a random place and of
a random size, on a textured background, optionally among smaller distractor shapes of other
kinds (``clutter``) that a model must learn to look past; with ``colours`` an item's kind is its
object's shape *and* palette colour, and the distractors are drawn in the palette too, so only
the object's cells say which colour goes with which shape. Each user prefers one kind: most of
their interactions are items of that kind, the rest are random. A good model therefore recommends a
user's kind, and its component attention should sit on the object rather than the background:
``World.object_cover`` says, for every item and every cell of the 7x7 grid the CNN sees, which
share of the cell the object covers.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service.model.backbones import GRID  # the grid of cells the CNN sees

KINDS = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
PALETTE = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 70, 230),
           "yellow": (240, 220, 30), "magenta": (220, 40, 220), "cyan": (30, 220, 230),
           "orange": (250, 140, 20), "white": (250, 250, 250)}  # fmt: skip


@dataclass(frozen=True)
class WorldSpec:
    n_users: int = 60
    n_items: int = 80
    kinds: int = 4  # shapes in play: the first ones of KINDS
    interactions_per_user: int = 20
    taste: float = 0.9  # share of a user's interactions (or runs) of their favourite kind
    # Mean length of a run of same-kind items. 1: every interaction is drawn on its own (taste
    # is static, order carries nothing); above 1: users go through runs (a run of the
    # favourite kind with probability ``taste``, else of another kind), so the newest items
    # tell what comes next, and a model should follow a new kind as soon as it shows up.
    run_length: float = 1.0
    # Items of each kind drawn after the catalogue, with ids N+1.., in ``new/`` and listed
    # nowhere: images of items no model has seen, to add while serving (cold start).
    new_per_kind: int = 0
    image_size: int = 112
    # The object's side, as a share of the image side, is drawn from [object_min, object_max).
    object_min: float = 1 / 3
    object_max: float = 1 / 2
    # Distractors per image: shapes of other kinds than the item's, their side a share of the
    # object's drawn from [clutter_min, clutter_max), drawn under it. They say nothing about
    # the item, so an image's mean carries them as noise while attention that finds the
    # object does not.
    clutter: int = 0
    clutter_min: float = 1 / 3
    clutter_max: float = 1 / 2
    # 0: an item's kind is its object's shape, drawn in a colour that stands out from the
    # background. n > 0: its kind is a shape *and* one of n palette colours (kinds x n kinds in
    # all), and distractors are drawn in the palette too, so the image's mean holds shapes and
    # colours without saying which goes with which; only the object's cells do.
    colours: int = 0
    seed: int = 0

    @property
    def classes(self) -> int:
        """Kinds users choose between: shapes, or shapes x colours."""
        return self.kinds * max(self.colours, 1)


@dataclass(frozen=True)
class World:
    root: Path
    item_kinds: np.ndarray  # (N,) index into KINDS, for item ids 1..N
    user_kinds: np.ndarray  # (U,) favourite kind of user ids 0..U-1
    object_boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 of the object, in pixels
    object_cover: np.ndarray  # (N, GRID * GRID) share of each grid cell (row-major) on the object
    new_kinds: np.ndarray  # (M,) kinds of the unlisted items N+1..N+M, images new/<id>.png


def make_world(root: Path, spec: WorldSpec = WorldSpec()) -> World:
    """Write ``items.csv``, ``interactions.csv`` and ``images/`` into ``root``."""
    rng = np.random.default_rng(spec.seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if not 2 <= spec.kinds <= len(KINDS):
        raise ValueError(f"kinds must be in 2..{len(KINDS)}, got {spec.kinds}")
    if not 0.05 <= spec.object_min < spec.object_max < 1:
        raise ValueError(
            f"need 0.05 <= object_min < object_max < 1, got {spec.object_min}, {spec.object_max}"
        )
    if spec.clutter < 0:
        raise ValueError(f"clutter must be >= 0, got {spec.clutter}")
    if not 0 < spec.clutter_min < spec.clutter_max <= 1:
        raise ValueError(
            f"need 0 < clutter_min < clutter_max <= 1, got {spec.clutter_min}, {spec.clutter_max}"
        )
    if not 0 <= spec.colours <= len(PALETTE):
        raise ValueError(f"colours must be in 0..{len(PALETTE)}, got {spec.colours}")
    item_kinds = np.arange(spec.n_items) % spec.classes
    rng.shuffle(item_kinds)
    drawn = [
        _draw_item(root / "images" / f"{i + 1}.png", int(k), spec, rng)
        for i, k in enumerate(item_kinds)
    ]
    boxes = np.stack([box for box, _ in drawn])
    cover = np.stack([cell_cover(mask) for _, mask in drawn])
    user_kinds = rng.integers(0, spec.classes, size=spec.n_users)
    with (root / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres", "image"])
        for i, k in enumerate(item_kinds):
            name = _kind_name(int(k), spec)
            w.writerow([i + 1, f"{name} #{i + 1}", name, f"images/{i + 1}.png"])
    with (root / "interactions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u, kind in enumerate(user_kinds):
            for t, item in enumerate(_history(item_kinds, int(kind), spec, rng)):
                w.writerow([u, item, 1_000_000 + 60 * t])
    new_kinds = np.repeat(np.arange(spec.classes), spec.new_per_kind)
    if len(new_kinds):
        (root / "new").mkdir(exist_ok=True)
    for j, kind in enumerate(new_kinds):
        _draw_item(root / "new" / f"{spec.n_items + j + 1}.png", int(kind), spec, rng)
    return World(root, item_kinds, user_kinds, boxes, cover, new_kinds)


def cell_cover(mask: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(S, S) bool object mask -> (grid * grid,) share of each cell's pixels on the object;
    cell (r, c) spans rows [r S / grid, (r + 1) S / grid) of the image, as the squashed
    image the CNN sees."""
    size = mask.shape[0]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    return np.array(
        [
            mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].mean()
            for r in range(grid)
            for c in range(grid)
        ]
    )


def _history(
    item_kinds: np.ndarray, kind: int, spec: WorldSpec, rng: np.random.Generator
) -> list[int]:
    if spec.run_length > 1:
        return _runs(item_kinds, kind, spec, rng)
    liked = np.flatnonzero(item_kinds == kind) + 1
    others = np.flatnonzero(item_kinds != kind) + 1
    n_liked = min(round(spec.interactions_per_user * spec.taste), len(liked))
    n_other = min(spec.interactions_per_user - n_liked, len(others))
    items = np.concatenate(
        [rng.choice(liked, n_liked, replace=False), rng.choice(others, n_other, replace=False)]
    )
    rng.shuffle(items)
    return items.tolist()


def _runs(
    item_kinds: np.ndarray, favourite: int, spec: WorldSpec, rng: np.random.Generator
) -> list[int]:
    """Runs of one kind each, of geometric length with mean ``run_length``."""
    kinds = range(spec.classes)
    unseen = [list(rng.permutation(np.flatnonzero(item_kinds == k) + 1)) for k in kinds]
    items: list[int] = []
    while len(items) < spec.interactions_per_user and any(unseen):
        others = [k for k in kinds if k != favourite]
        kind = favourite if rng.random() < spec.taste else int(rng.choice(others))
        length = int(rng.geometric(1.0 / spec.run_length))
        take = min(length, len(unseen[kind]), spec.interactions_per_user - len(items))
        items += [int(unseen[kind].pop()) for _ in range(take)]
    return items


def _draw_item(
    path: Path, kind: int, spec: WorldSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one item; returns the object's bounding box and its (size, size) bool mask."""
    size = spec.image_size
    background = rng.integers(40, 216, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    side = int(rng.integers(int(size * spec.object_min), int(size * spec.object_max)))
    others = [k for k in range(spec.classes) if k != kind]
    for _ in range(spec.clutter):  # under the object, so its mask stays whole
        small = max(int(side * rng.uniform(spec.clutter_min, spec.clutter_max)), 4)
        x, y = (int(v) for v in rng.integers(0, size - small + 1, size=2))
        if spec.colours:
            other = int(rng.choice(others))
            shape, tint = _shape(other, spec), _palette(other, spec, rng)
        else:
            tint = tuple(int(c) for c in rng.integers(0, 256, size=3))
            shape = KINDS[int(rng.choice(others))]
        _draw_shape(draw, shape, (x, y, x + small, y + small), tint)
    x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    if spec.colours:
        colour = _palette(kind, spec, rng)
    else:
        shift = rng.integers(-30, 30, size=3)
        colour = tuple(int(c) for c in (255 - background + shift).clip(0, 255))
    mask = Image.new("L", (size, size), 0)
    _draw_shape(draw, _shape(kind, spec), box, colour)
    _draw_shape(ImageDraw.Draw(mask), _shape(kind, spec), box, 255)
    img.save(path)
    return np.array(box), np.asarray(mask) > 0


def _shape(kind: int, spec: WorldSpec) -> str:
    return KINDS[kind % spec.kinds]


def _palette(kind: int, spec: WorldSpec, rng: np.random.Generator) -> tuple[int, ...]:
    """The kind's palette colour, a little jittered."""
    base = np.array(list(PALETTE.values())[kind // spec.kinds])
    return tuple(int(c) for c in (base + rng.integers(-20, 20, size=3)).clip(0, 255))


def _kind_name(kind: int, spec: WorldSpec) -> str:
    colour = f"{list(PALETTE)[kind // spec.kinds]} " if spec.colours else ""
    return colour + _shape(kind, spec)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    box: tuple[int, int, int, int],
    fill: int | tuple[int, ...],
) -> None:
    x0, y0, x1, _ = box
    side = x1 - x0
    third, half = side // 3, side // 2
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y0 + side), (x0 + half, y0), (x0 + side, y0 + side)], fill=fill)
    elif kind == "cross":
        draw.rectangle((x0 + third, y0, x0 + 2 * third, y0 + side), fill=fill)
        draw.rectangle((x0, y0 + third, x0 + side, y0 + 2 * third), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(side // 6, 2))
    elif kind == "diamond":
        draw.polygon(
            [(x0 + half, y0), (x0 + side, y0 + half), (x0 + half, y0 + side), (x0, y0 + half)],
            fill=fill,
        )
    elif kind == "bar":
        draw.rectangle((x0, y0 + third, x0 + side, y0 + 2 * third), fill=fill)
    else:  # a five-pointed star
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, half * 0.4)
        cx, cy = x0 + half, y0 + half
        draw.polygon(
            [(cx + r * np.cos(a), cy - r * np.sin(a)) for r, a in zip(radii, angles, strict=True)],
            fill=fill,
        )
