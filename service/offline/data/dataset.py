"""Loading and validating a dataset folder, and the leave-last-out split.

A dataset is a folder with:
- ``interactions.csv``: ``user_id,item_id,timestamp`` (optional ``rating``), every row an implicit
  positive;
- ``items.csv``: ``item_id,image`` (optional ``title``, and ``genres``, ``|``-separated),
  ``image`` relative to the folder;
- the images.

Items are encoded as ``1..N`` in ``items.csv`` order (``0`` is the padding index of the model) and
users as ``0..U-1`` in order of first appearance.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.model.tags import item_tags

log = logging.getLogger(__name__)

PAD = 0  # item index reserved for "no item" in profiles


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is; the message says why."""


@dataclass(frozen=True)
class LoadReport:
    """What loading changed, so that nothing is dropped silently."""

    duplicates_collapsed: int = 0
    unknown_item_rows: int = 0
    unknown_item_ids: tuple[int, ...] = ()
    items_without_image: tuple[int, ...] = ()
    rows_of_items_without_image: int = 0

    def lines(self) -> list[str]:
        out = []
        if self.duplicates_collapsed:
            out.append(
                f"collapsed {self.duplicates_collapsed} duplicate (user, item) rows "
                "into their latest occurrence"
            )
        if self.unknown_item_rows:
            out.append(
                f"dropped {self.unknown_item_rows} interactions with "
                f"{len(self.unknown_item_ids)} item ids missing from items.csv "
                f"(e.g. {_examples(self.unknown_item_ids)})"
            )
        if self.items_without_image:
            out.append(
                f"dropped {len(self.items_without_image)} items whose image is missing or "
                f"unreadable (e.g. {_examples(self.items_without_image)}) and their "
                f"{self.rows_of_items_without_image} interactions"
            )
        return out


@dataclass(frozen=True)
class Dataset:
    """A validated dataset; interactions keep the file's order (which breaks timestamp ties).

    Arrays: ``users`` (T,) in 0..U-1, ``items`` (T,) in 1..N, ``timestamps`` (T,) int64.
    """

    root: Path
    item_ids: np.ndarray  # (N,) raw item id of item index i+1
    image_paths: tuple[Path, ...]  # (N,)
    titles: tuple[str, ...]  # (N,) "" where unknown
    user_ids: np.ndarray  # (U,) raw user id of user index u
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    report: LoadReport = field(default_factory=LoadReport)
    genres: tuple[frozenset[str], ...] = ()  # (N,) empty sets where unknown; () without a column

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def tags(self) -> tuple[frozenset[str], ...]:
        """(N,) each item's metadata, title and genres, as the tags ACF's metadata channel
        reads (:func:`service.model.tags.item_tags`)."""
        genres = self.genres or (frozenset(),) * self.n_items
        return tuple(item_tags(t, g) for t, g in zip(self.titles, genres, strict=True))


@dataclass(frozen=True)
class Split:
    """Leave-last-out split. Each part: parallel (users, items) arrays in chronological order,
    and the training interactions' timestamps.

    ``val``/``test`` hold at most one interaction per user.
    """

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    val_users: np.ndarray
    val_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    train_times: np.ndarray  # (T,) int64 seconds, beside train_items

    def train_sequences(self) -> list[np.ndarray]:
        """Per user, their training items in chronological order."""
        return group_by_user(self.train_users, self.train_items, self.n_users)

    def train_time_sequences(self) -> list[np.ndarray]:
        """Per user, the timestamps of :meth:`train_sequences`' items."""
        return group_by_user(self.train_users, self.train_times, self.n_users)


def _read_items(
    root: Path,
) -> tuple[np.ndarray, list[Path], list[str], list[frozenset[str]]]:
    """``items.csv``'s ids (unique, or DatasetError), image paths, titles and genres (an empty
    list when the file has no genres column)."""
    item_rows = _read_csv(root / "items.csv", required=("item_id", "image"))
    raw_item_ids = _int_column(item_rows, "item_id", root / "items.csv")
    if len(set(raw_item_ids.tolist())) != len(raw_item_ids):
        raise DatasetError(f"{root / 'items.csv'}: item_id values are not unique")
    paths = [root / row["image"] for row in item_rows]
    titles = [row.get("title") or "" for row in item_rows]
    genres = (
        [frozenset(g for g in (row["genres"] or "").split("|") if g) for row in item_rows]
        if "genres" in item_rows[0]
        else []
    )
    return raw_item_ids, paths, titles, genres


def load_dataset(root: Path, *, check_images: bool = True) -> Dataset:
    """Read and validate a dataset folder; raise :class:`DatasetError` on what cannot be fixed."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    raw_item_ids, paths, titles, genres = _read_items(root)
    rows = _read_csv(root / "interactions.csv", required=("user_id", "item_id", "timestamp"))
    inter_path = root / "interactions.csv"
    raw_users = _int_column(rows, "user_id", inter_path)
    raw_items = _int_column(rows, "item_id", inter_path)
    timestamps = _int_column(rows, "timestamp", inter_path)

    bad_images = _unreadable_images(paths) if check_images else []
    keep_item = np.ones(len(raw_item_ids), dtype=bool)
    keep_item[bad_images] = False
    known = np.isin(raw_items, raw_item_ids)
    unknown_ids = tuple(sorted(set(raw_items[~known].tolist())))
    no_image = np.isin(raw_items, raw_item_ids[~keep_item])
    keep_row = known & ~no_image
    raw_users, raw_items, timestamps = (
        raw_users[keep_row],
        raw_items[keep_row],
        timestamps[keep_row],
    )

    raw_users, raw_items, timestamps, n_dupes = _collapse_duplicates(
        raw_users, raw_items, timestamps
    )
    kept_ids = raw_item_ids[keep_item]
    if len(raw_users) == 0:
        raise DatasetError(f"{inter_path}: no usable interactions left after validation")
    item_index = {int(i): k + 1 for k, i in enumerate(kept_ids)}
    user_ids, users = np.unique(raw_users, return_inverse=True)
    report = LoadReport(
        duplicates_collapsed=n_dupes,
        unknown_item_rows=int((~known).sum()),
        unknown_item_ids=unknown_ids,
        items_without_image=tuple(int(raw_item_ids[i]) for i in bad_images),
        rows_of_items_without_image=int((known & no_image).sum()),
    )
    for line in report.lines():
        log.warning("%s: %s", root, line)
    return Dataset(
        root=root,
        item_ids=kept_ids,
        image_paths=tuple(p for p, k in zip(paths, keep_item, strict=True) if k),
        titles=tuple(t for t, k in zip(titles, keep_item, strict=True) if k),
        genres=tuple(g for g, k in zip(genres, keep_item, strict=True) if k) if genres else (),
        user_ids=user_ids,
        users=users.astype(np.int64),
        items=np.array([item_index[int(i)] for i in raw_items], dtype=np.int64),
        timestamps=timestamps,
        report=report,
    )


def fingerprint(root: Path) -> str:
    """What a plan's settings were tuned on: the first 16 hex digits of the sha256 of the
    dataset's ``interactions.csv`` (another folder name for the same data matches; the same
    name for other data does not)."""
    digest = hashlib.sha256()
    with (Path(root) / "interactions.csv").open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def leave_last_out(data: Dataset) -> Split:
    """Per user, the last interaction is test and the one before it validation.

    "Last" is by timestamp, ties broken by file order. Users with two interactions get no
    validation item and users with one get only training data.
    """
    order = np.lexsort((np.arange(len(data.users)), data.timestamps, data.users))
    users, items, times = data.users[order], data.items[order], data.timestamps[order]
    # position from the end within each user's run: 0 = last
    counts = np.bincount(users, minlength=data.n_users)
    ends = np.cumsum(counts)
    from_end = ends[users] - 1 - np.arange(len(users))
    n_user = counts[users]
    test = from_end == 0
    val = (from_end == 1) & (n_user >= 3)
    test &= n_user >= 2
    return _parts(data, users, items, times, ~(test | val), val, test)


def _parts(
    data: Dataset,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
) -> Split:
    """The split of the (time-ordered) ``users``/``items``/``times`` by the three masks."""
    return Split(
        n_users=data.n_users,
        n_items=data.n_items,
        train_users=users[train],
        train_items=items[train],
        val_users=users[val],
        val_items=items[val],
        test_users=users[test],
        test_items=items[test],
        train_times=times[train].astype(np.int64),
    )


def user_disjoint(split: Split, rng: np.random.Generator) -> Split:
    """The same split with validation items of one half of the users (drawn with ``rng``)
    and test items of the other half only: settings chosen on its validation are judged on
    users whose held-out items never took part in choosing them. Training data is unchanged."""
    tuning = rng.permutation(split.n_users)[: split.n_users // 2]
    val = np.isin(split.val_users, tuning)
    test = ~np.isin(split.test_users, tuning)
    return replace(
        split,
        val_users=split.val_users[val],
        val_items=split.val_items[val],
        test_users=split.test_users[test],
        test_items=split.test_items[test],
    )


def split_at(data: Dataset, cut: int) -> Split:
    """A split in time: interactions before ``cut`` (a timestamp) are split leave-last-out
    into training and validation (each user's last one before the cut; users with two or
    more), and a user's test item is their first interaction at or after the cut (users with
    a validation item). Nothing after the cut is trained on or validated with."""
    order = np.lexsort((np.arange(len(data.users)), data.timestamps, data.users))
    users, items, times = data.users[order], data.items[order], data.timestamps[order]
    before = times < cut
    n_before = np.bincount(users[before], minlength=data.n_users)
    # rows before the cut come first in each user's run, in time order
    starts = np.r_[0, np.cumsum(np.bincount(users, minlength=data.n_users))[:-1]]
    index = np.arange(len(users)) - starts[users]  # position within the user's run
    validated = (n_before >= 2)[users]
    val = before & (index == n_before[users] - 1) & validated
    test = ~before & (index == n_before[users]) & validated
    return _parts(data, users, items, times, before & ~val, val, test)


def busiest_cut(data: Dataset, quantiles: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> int:
    """The timestamp, among these quantiles of all of them, that leaves the most users with
    a test item in :func:`split_at` (no label is read: only who was active when)."""

    def tested(cut: int) -> int:
        before = np.bincount(data.users[data.timestamps < cut], minlength=data.n_users)
        after = np.bincount(data.users[data.timestamps >= cut], minlength=data.n_users)
        return int(((before >= 2) & (after >= 1)).sum())

    cuts = [int(np.quantile(data.timestamps, q)) for q in quantiles]
    return max(cuts, key=tested)


def group_by_user(users: np.ndarray, items: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Per user 0..n_users-1, their ``items`` in the order given (a stable grouping)."""
    order = np.argsort(users, kind="stable")
    bounds = np.cumsum(np.bincount(users, minlength=n_users))[:-1]
    return np.split(items[order], bounds)


def _read_csv(path: Path, *, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)} "
                f"(found: {', '.join(columns) or 'none'})"
            )
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{path} has no rows")
    return rows


def _int_column(rows: list[dict[str, str]], name: str, path: Path) -> np.ndarray:
    values = np.empty(len(rows), dtype=np.int64)
    bad: list[tuple[int, str]] = []
    for k, row in enumerate(rows):
        text = (row.get(name) or "").strip()
        try:
            values[k] = int(text)
        except ValueError:
            bad.append((k + 2, text))  # +2: header line and 1-based numbering
    if bad:
        shown = ", ".join(f"line {line}: {text!r}" for line, text in bad[:5])
        raise DatasetError(f"{path}: {len(bad)} non-integer {name} value(s) ({shown})")
    return values


def _unreadable_images(paths: Sequence[Path]) -> list[int]:
    return [k for k, p in enumerate(paths) if not _readable(p)]


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False
    return True


def _collapse_duplicates(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Keep the latest (by timestamp, then file order) occurrence of each (user, item)."""
    rows = np.arange(len(users))
    order = np.lexsort((rows, timestamps, items, users))
    u, i = users[order], items[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    keep = np.sort(order[last])  # back to file order
    return users[keep], items[keep], timestamps[keep], len(users) - len(keep)


def _examples(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
