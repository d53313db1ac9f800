"""Files written whole or not at all (service/files.py): what every checkpoint, training state,
fitted backbone, feature metadata, index cache and registry version is written with."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import service.files as files
from service.files import sync_tree, write_atomically
from service.model.acf import ACF, ACFConfig
from service.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def _checkpoint(seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    config = ACFConfig(n_users=3, n_items=5, feature_dim=4, n_components=2, dim=8)
    return Checkpoint(
        config=config,
        state=ACF(config, torch.zeros(5, 2, 4)).state_dict(),
        user_ids=[1, 2, 3],
        item_ids=[1, 2, 3, 4, 5],
        features={"backbone": "test", "inputs_hash": "abc"},
        validation={"nDCG@20": 0.5},
    )


def test_a_write_that_fails_halfway_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(b"previous")

    def half(tmp: Path) -> None:
        tmp.write_bytes(b"new, but cut")
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]
    write_atomically(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


def test_writers_at_once_each_leave_a_whole_file(tmp_path: Path) -> None:
    """Two processes starting on one folder write the same file: each write takes its own
    temporary name, so none fails and the file is always one writer's whole content."""
    path = tmp_path / "features.json"
    contents = [bytes([65 + i]) * 100_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(content: bytes) -> None:
        try:
            for _ in range(20):
                write_atomically(path, lambda tmp: tmp.write_bytes(content))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["features.json"]


def test_a_checkpoint_save_killed_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "served.pt"
    save_checkpoint(path, _checkpoint(0))
    before = path.read_bytes()

    def cut(obj: object, f: Path) -> None:
        Path(f).write_bytes(before[: len(before) // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(path, _checkpoint(1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    kept = load_checkpoint(path).state["item_embedding.weight"]
    torch.testing.assert_close(kept, _checkpoint(0).state["item_embedding.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["served.pt"]


def test_sync_tree_reaches_every_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_text(name)
    synced: list[str] = []
    real = files.sync
    monkeypatch.setattr(
        files, "sync", lambda p: (synced.append(str(Path(p).relative_to(tmp_path))), real(p))
    )
    sync_tree(tmp_path)
    assert sorted(synced) == sorted([".", "a", "a/b", "x", "a/y", "a/b/z"])
