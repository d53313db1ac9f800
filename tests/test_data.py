"""Dataset loading, validation and the leave-last-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.offline.data.dataset import DatasetError, leave_last_out, load_dataset


def _folder(
    root: Path, interactions: str, items: str | None = None, images: tuple[int, ...] = (1, 2, 3)
) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in images:
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "images" / f"{i}.png")
    if items is None:
        items = "item_id,image\n" + "".join(f"{i},images/{i}.png\n" for i in (1, 2, 3))
    (root / "items.csv").write_text(items)
    (root / "interactions.csv").write_text(interactions)
    return root


def test_real_movielens_loads_whole(ml100k: Path) -> None:
    data = load_dataset(ml100k)
    assert (data.n_users, data.n_items, len(data.users)) == (943, 1667, 99926)
    assert data.report.lines() == []
    assert data.items.min() == 1 and data.items.max() == data.n_items
    split = leave_last_out(data)
    assert len(split.test_users) == len(split.val_users) == 943
    assert len(split.train_users) == 99926 - 2 * 943


def test_the_split_follows_time_then_file_order(tmp_path: Path) -> None:
    # user 7: item 3 at t=5 is last; items 1 and 2 tie at t=4, so file order makes 2 the later
    rows = "user_id,item_id,timestamp\n7,3,5\n7,1,4\n7,2,4\n9,1,1\n9,2,2\n"
    split = leave_last_out(load_dataset(_folder(tmp_path, rows)))
    # users are indexed by raw id: 7 -> 0, 9 -> 1; items 1..3 keep their row order in items.csv
    assert dict(zip(split.test_users.tolist(), split.test_items.tolist(), strict=True)) == {
        0: 3,
        1: 2,
    }
    assert split.val_users.tolist() == [0] and split.val_items.tolist() == [2]
    assert split.train_sequences()[0].tolist() == [1]
    assert split.train_sequences()[1].tolist() == [1]  # two interactions: no validation item


def test_duplicates_collapse_into_the_latest(tmp_path: Path) -> None:
    rows = "user_id,item_id,timestamp\n1,1,1\n1,2,2\n1,1,3\n1,3,4\n"
    data = load_dataset(_folder(tmp_path, rows))
    assert data.report.duplicates_collapsed == 1
    assert data.items.tolist() == [2, 1, 3]
    assert any("duplicate" in line for line in data.report.lines())


def test_unknown_items_are_dropped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = "user_id,item_id,timestamp\n1,1,1\n1,42,2\n1,43,3\n2,43,4\n2,2,5\n"
    data = load_dataset(_folder(tmp_path, rows))
    assert data.report.unknown_item_rows == 3
    assert data.report.unknown_item_ids == (42, 43)
    assert len(data.users) == 2
    assert "3 interactions with 2 item ids missing from items.csv" in caplog.text


def test_items_without_a_readable_image_are_dropped_with_their_rows(tmp_path: Path) -> None:
    rows = "user_id,item_id,timestamp\n1,1,1\n1,2,2\n1,3,3\n2,3,1\n"
    root = _folder(tmp_path, rows, images=(1, 2))  # 3.png is missing
    data = load_dataset(root)
    assert data.item_ids.tolist() == [1, 2]
    assert data.report.items_without_image == (3,)
    assert data.report.rows_of_items_without_image == 2
    (root / "images" / "2.png").write_bytes(b"not an image")
    assert load_dataset(root).report.items_without_image == (2, 3)


@pytest.mark.parametrize(
    ("interactions", "items", "message"),
    [
        ("user_id,item_id\n1,1\n", None, "missing column.*timestamp"),
        (
            "user_id,item_id,timestamp\n1,1,1\nx,2,2\nu3,1,1\n",
            None,
            r"2 non-integer user_id value\(s\) \(line 3: 'x', line 4: 'u3'\)",
        ),
        ("user_id,item_id,timestamp\n1,1,1\n", "item_id,title\n1,a\n", "missing column.*image"),
        (
            "user_id,item_id,timestamp\n1,1,1\n",
            "item_id,image\n1,images/1.png\n1,images/1.png\n",
            "not unique",
        ),
        ("user_id,item_id,timestamp\n", None, "no rows"),
        ("user_id,item_id,timestamp\n1,99,1\n", None, "no usable interactions"),
    ],
)
def test_what_cannot_be_fixed_is_a_clear_error(
    tmp_path: Path, interactions: str, items: str | None, message: str
) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(_folder(tmp_path, interactions, items))


def test_a_missing_folder_or_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    root = _folder(tmp_path, "user_id,item_id,timestamp\n1,1,1\n")
    (root / "items.csv").unlink()
    with pytest.raises(DatasetError, match=r"items\.csv is missing"):
        load_dataset(root)


def test_optional_rating_column_is_accepted(tmp_path: Path) -> None:
    rows = "user_id,item_id,rating,timestamp\n1,1,5,1\n1,2,1,2\n"
    data = load_dataset(_folder(tmp_path, rows))
    np.testing.assert_array_equal(data.items, [1, 2])
