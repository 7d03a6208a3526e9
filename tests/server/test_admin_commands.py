"""`brightrun-server backup | restore | create-key`: the administration that
needs no running server, run as the real command in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from brightrun.v1 import api_key_service_pb2 as ak
from brightrun.v1 import api_key_service_pb2_grpc, dataset_service_pb2, dataset_service_pb2_grpc
from tests.conftest import ServerHandle, start_server, stop_server


def admin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIGHTRUN_")}
    return subprocess.run(
        [sys.executable, "-m", "brightrun_server", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def upload(handle: ServerHandle, name: str) -> str:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(handle.channel())
    body = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    chunks = [
        dataset_service_pb2.UploadDatasetRequest(
            metadata=dataset_service_pb2.UploadDatasetMetadata(name=name, filename=f"{name}.jsonl")
        ),
        dataset_service_pb2.UploadDatasetRequest(chunk=body),
    ]
    return str(stub.UploadDataset(iter(chunks)).id)


def names(handle: ServerHandle) -> set[str]:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(handle.channel())
    return {d.name for d in stub.ListDatasets(dataset_service_pb2.ListDatasetsRequest()).datasets}


def test_backup_while_serving_then_restore_brings_back_exactly_that_state(tmp_path: Path) -> None:
    backup = tmp_path / "store.backup"
    handle = start_server(tmp_path)
    try:
        upload(handle, "before-backup")
        made = admin("backup", backup, "--data-dir", handle.data_dir)
        assert made.returncode == 0, made.stderr
        assert "1 datasets" in made.stdout
        upload(handle, "after-backup")
        # A restore under a running server is refused, and changes nothing.
        refused = admin("restore", backup, "--data-dir", handle.data_dir)
        assert refused.returncode != 0
        assert "in use by a running BrightRun server" in refused.stderr
        assert names(handle) == {"before-backup", "after-backup"}
    finally:
        stop_server(handle)
    done = admin("restore", backup, "--data-dir", handle.data_dir)
    assert done.returncode == 0, done.stderr
    assert "kept at" in done.stdout  # the replaced database is moved aside, not deleted
    handle = start_server(tmp_path)
    try:
        assert names(handle) == {"before-backup"}
    finally:
        stop_server(handle)


def test_backup_refuses_to_overwrite_and_a_corrupt_backup_is_not_restored(tmp_path: Path) -> None:
    handle = start_server(tmp_path)
    try:
        upload(handle, "kept")
        backup = tmp_path / "b.sqlite"
        assert admin("backup", backup, "--data-dir", handle.data_dir).returncode == 0
        again = admin("backup", backup, "--data-dir", handle.data_dir)
        assert again.returncode != 0
        assert "exists" in again.stderr
    finally:
        stop_server(handle)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    bad = admin("restore", corrupt, "--data-dir", handle.data_dir)
    assert bad.returncode != 0
    assert "restore failed" in bad.stderr
    handle = start_server(tmp_path)
    try:
        assert names(handle) == {"kept"}
    finally:
        stop_server(handle)


def test_create_key_gives_a_new_project_its_first_admin(tmp_path: Path) -> None:
    handle = start_server(tmp_path)
    data_dir = handle.data_dir
    stop_server(handle)
    made = admin("create-key", "--project", "team-b", "--role", "admin", "--name", "first", "--data-dir", data_dir)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("brk_")
    assert "shown once" in made.stderr
    bad = admin("create-key", "--project", "", "--data-dir", data_dir)
    assert bad.returncode != 0
    assert "--project" in bad.stderr
    handle = start_server(tmp_path)
    try:
        keys = api_key_service_pb2_grpc.ApiKeyServiceStub(handle.channel(secret))
        who = keys.GetCaller(ak.GetCallerRequest())
        assert (who.project, who.role) == ("team-b", ak.ROLE_ADMIN)
        # The new project's admin makes its own keys, and sees nothing of the default project.
        member = keys.CreateApiKey(ak.CreateApiKeyRequest(name="ci", role=ak.ROLE_MEMBER))
        assert member.api_key.project == "team-b"
        listed = keys.ListApiKeys(ak.ListApiKeysRequest())
        assert {k.name for k in listed.api_keys} == {"first", "ci"}
    finally:
        stop_server(handle)
