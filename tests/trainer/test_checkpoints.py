"""Checkpoint files: atomic writes, manifests, verification, pruning."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from brightrun_trainer.checkpoints import (
    LATEST,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    verify_checkpoint,
)


def _writer(payload: bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(payload)
        (directory / "state.json").write_text(json.dumps({"n": len(payload)}))

    return write


def _save(store: CheckpointStore, step: int) -> Path:
    saved = store.save(step, _writer(bytes([step % 256]) * 1000), {"epoch": step / 10})
    return saved.path


def test_save_writes_manifest_with_checksums_and_moves_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    saved = store.save(7, _writer(b"abc" * 100), {"epoch": 0.5, "data_position": [0, 7]})
    assert saved.path == tmp_path / "checkpoints" / "step-00000007"
    manifest_bytes = (saved.path / MANIFEST).read_bytes()
    manifest = json.loads(manifest_bytes)
    assert manifest["step"] == 7
    assert manifest["data_position"] == [0, 7]
    assert manifest["files"]["weights.bin"] == {
        "sha256": hashlib.sha256(b"abc" * 100).hexdigest(),
        "size": 300,
    }
    assert saved.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert saved.size_bytes == sum(p.stat().st_size for p in saved.path.iterdir())
    assert (store.root / LATEST).read_text().strip() == "step-00000007"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
    assert verify_checkpoint(saved.path).step == 7


def test_failed_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")

    def broken(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save(3, broken, {})
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_is_skipped_for_the_previous(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    _save(store, 4)
    newest = _save(store, 8)
    target = newest / "weights.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[500] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        target.unlink()
    else:
        (newest / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError):
        verify_checkpoint(newest)
    skipped: list[str] = []
    found = store.find_resumable(lambda path, why: skipped.append(path.name))
    assert found is not None
    assert found.step == 4
    assert skipped == ["step-00000008"]
    assert not newest.exists()  # quarantined: never retried, never in the way
    # A new checkpoint of the same step can be written afterwards.
    assert verify_checkpoint(_save(store, 8)).step == 8


def test_partial_folders_are_ignored_and_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    _save(store, 2)
    partial = store.root / ".tmp-step-00000004-deadbeef"
    partial.mkdir()
    (partial / "weights.bin").write_bytes(b"x")
    found = store.find_resumable()
    assert found is not None
    assert found.step == 2
    store.clean_partial()
    assert not partial.exists()


def test_keeps_only_the_newest_k(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3, 4):
        _save(store, step)
    assert [s for s, _ in store.complete()] == [4, 3]


def test_supersede_moves_newer_timelines_aside(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep=5)
    for step in (2, 4, 6):
        _save(store, step)
    store.supersede_after(2)
    assert [s for s, _ in store.complete()] == [2]
    assert len([p for p in store.root.iterdir() if p.name.startswith(".superseded-")]) == 2
