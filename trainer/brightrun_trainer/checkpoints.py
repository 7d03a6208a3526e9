"""Atomic, checksummed checkpoints.

Writing (:meth:`CheckpointStore.save`): every file goes to
``checkpoints/.tmp-step-XXXXXXXX-<random>/`` and is fsynced; ``manifest.json``
lists the SHA-256 and size of each file plus the step, epoch and data position;
the folder is fsynced, renamed to ``checkpoints/step-XXXXXXXX``, the parent is
fsynced, and finally ``checkpoints/LATEST`` is replaced atomically.

Reading (:meth:`CheckpointStore.find_resumable`): complete ``step-*`` folders
newest first; every checksum is verified and the first that verifies wins.
Corrupt or partial ones are moved aside to ``.corrupt-*`` (never retried, never
in the way of a new checkpoint of the same step) and reported to the caller.

Only the newest ``keep`` complete checkpoints are kept. Pruning runs after a
new checkpoint is complete, so the one a run resumed from survives until a
newer one exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint is missing, partial or fails its checksums."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True, slots=True)
class SavedCheckpoint:
    path: Path
    step: int
    size_bytes: int
    manifest_sha256: str


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def verify_checkpoint(path: Path) -> VerifiedCheckpoint:
    """Check the manifest and every file it lists; raise :class:`CheckpointError` if bad."""
    manifest_path = path / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path.name}: no readable manifest ({e.strerror})") from e
    try:
        manifest = json.loads(raw)
        files: dict[str, dict[str, Any]] = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: malformed manifest") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path.name}: unknown manifest format {manifest.get('format')!r}")
    for name, entry in sorted(files.items()):
        file = path / name
        if "/" in name or name == MANIFEST or not file.is_file():
            raise CheckpointError(f"{path.name}: file {name} is missing")
        if file.stat().st_size != entry.get("size"):
            raise CheckpointError(f"{path.name}: file {name} has the wrong size")
        if sha256_file(file) != entry.get("sha256"):
            raise CheckpointError(f"{path.name}: file {name} fails its SHA-256 check")
    return VerifiedCheckpoint(path, manifest, hashlib.sha256(raw).hexdigest())


class CheckpointStore:
    """The ``checkpoints/`` folder of a job."""

    def __init__(self, root: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = root
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every ``step-*`` folder, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
        return sorted(found, reverse=True)

    def clean_partial(self) -> None:
        """Remove ``.tmp-*`` folders left by a writer that died."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)

    def quarantine(self, path: Path, why: str) -> Path:
        """Move a checkpoint folder aside so resumes and new checkpoints ignore it."""
        target = self.root / f".{why}-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, target)
        fsync_path(self.root)
        return target

    def find_resumable(self, on_skip: Callable[[Path, str], None] | None = None) -> VerifiedCheckpoint | None:
        """The newest checkpoint that verifies; corrupt newer ones are quarantined."""
        for _, path in self.complete():
            try:
                return verify_checkpoint(path)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path.name, e)
                if on_skip is not None:
                    on_skip(path, str(e))
                self.quarantine(path, "corrupt")
        return None

    def supersede_after(self, step: int) -> None:
        """Move aside checkpoints newer than ``step`` (resuming from an older one)."""
        for s, path in self.complete():
            if s > step:
                log.info("moving aside %s: resuming from an older checkpoint", path.name)
                self.quarantine(path, "superseded")

    def save(self, step: int, write_files: Callable[[Path], None], meta: dict[str, Any]) -> SavedCheckpoint:
        """Write a checkpoint: ``write_files(tmp_dir)`` creates the payload files."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = step_dir_name(step)
        tmp = self.root / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            write_files(tmp)
            files: dict[str, dict[str, Any]] = {}
            for file in sorted(tmp.iterdir()):
                if not file.is_file():
                    raise CheckpointError(f"unexpected entry {file.name} in a checkpoint")
                fsync_path(file)
                files[file.name] = {"sha256": sha256_file(file), "size": file.stat().st_size}
            manifest = {"format": MANIFEST_FORMAT, "step": step, **meta, "files": files}
            raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
            write_bytes_durable(tmp / MANIFEST, raw)
            fsync_path(tmp)
            final = self.root / name
            if final.exists():
                # Left by an earlier timeline (e.g. quarantined resume); replace it.
                trash = self.root / f".trash-{name}-{secrets.token_hex(4)}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.point_latest(name)
        size = sum(f["size"] for f in files.values()) + len(raw)
        self.prune()
        return SavedCheckpoint(final, step, size, _sha256_bytes(raw))

    def point_latest(self, name: str) -> None:
        """Atomically make ``LATEST`` name the given checkpoint folder."""
        tmp = self.root / f".tmp-LATEST-{secrets.token_hex(4)}"
        write_bytes_durable(tmp, (name + "\n").encode())
        os.replace(tmp, self.root / LATEST)
        fsync_path(self.root)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        for _, path in self.complete()[self.keep :]:
            trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
