"""TLS and mutual TLS: real servers on real certificates (made at test time),
real trainers reporting over TLS, the SDK and the CLI as clients."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

import brightrun
from brightrun.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)
from brightrun_server.settings import ServerSettings
from tests.certs import Certs, Pair, make_certs
from tests.conftest import EXAMPLES, TEST_API_KEY, ServerHandle, auth_channel, start_server, stop_server
from tests.server.conftest import Stubs, attach, stage_adapter

State = job_pb2.Job.State


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_settings(certs: Certs, *, mutual: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "tls_cert_file": certs.server.cert,
        "tls_key_file": certs.server.key,
        "trainer_tls_ca_file": certs.ca.cert,
    }
    if mutual:
        settings |= {
            "tls_client_ca_file": certs.ca.cert,
            "trainer_tls_cert_file": certs.client.cert,
            "trainer_tls_key_file": certs.client.key,
        }
    return settings


def credentials(ca: Pair, client: Pair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def stubs_over(channel: grpc.Channel) -> Stubs:
    return Stubs(
        channel,
        dataset_service_pb2_grpc.DatasetServiceStub(channel),
        job_service_pb2_grpc.JobServiceStub(channel),
        trainer_service_pb2_grpc.TrainerServiceStub(channel),
    )


def list_datasets(channel: grpc.Channel) -> Any:
    return stubs_over(channel).datasets.ListDatasets(dataset_service_pb2.ListDatasetsRequest(), timeout=10)


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certs, sleeper: Path) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=2.0, **tls_settings(certs))
    yield handle
    stop_server(handle)


def test_a_tls_server_serves_tls_clients_and_its_trainers_and_refuses_plaintext(
    tls_server: ServerHandle, certs: Certs
) -> None:
    address = tls_server.address
    stubs = stubs_over(auth_channel(address, credentials=credentials(certs.ca)))
    try:
        # A whole job over TLS, the test playing the trainer with its token.
        dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes(), filename="support_chat.jsonl")
        job = stubs.jobs.CreateJob(job_service_pb2.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model"))
        attempt = attach(stubs, job.id)
        spec = json.loads((attempt.attempt_dir / "spec.json").read_text())
        assert spec["report"]["tls"] == {"ca_file": str(certs.ca.cert), "cert_file": None, "key_file": None}

        # The attempt token is still required on the TLS port.
        with pytest.raises(grpc.RpcError) as refused:
            attempt.send([attempt.next(stage=trainer_service_pb2.StageReport(stage=job_pb2.STAGE_PREPROCESSING))],
                         token="not-the-token")  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        attempt.seq = 0
        for stage in (job_pb2.STAGE_PREPROCESSING, job_pb2.STAGE_MODEL_LOADING, job_pb2.STAGE_TRAINING):
            attempt.stage(stage)
        attempt.metrics(range(1, 4))
        adapter = stage_adapter(attempt)
        attempt.stage(job_pb2.STAGE_FINALIZATION)
        succeeded = trainer_service_pb2.AttemptResult.OUTCOME_SUCCEEDED
        attempt.send([attempt.next(result=trainer_service_pb2.AttemptResult(outcome=succeeded, adapter_path=adapter,
                                                                            last_step=3))])  # fmt: skip
        stubs.wait_state(job.id, {State.STATE_COMPLETED})
        metrics = stubs.jobs.ListJobMetrics(job_service_pb2.ListJobMetricsRequest(job_id=job.id)).metrics
        assert [m.step for m in metrics] == [1, 2, 3]
    finally:
        stubs.channel.close()

    # Plaintext, or TLS trusting another CA, cannot talk to it.
    for channel in (auth_channel(address), auth_channel(address, credentials=credentials(certs.other_ca))):
        with channel, pytest.raises(grpc.RpcError) as failed:
            list_datasets(channel)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sdk_and_cli_reach_a_tls_server(
    tls_server: ServerHandle, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = tls_server.address
    with brightrun.Client(address, root_certificates=certs.ca.cert) as client:
        assert client.datasets.upload(EXAMPLES / "support_chat.jsonl").id
    with brightrun.Client(address, root_certificates=certs.ca.cert.read_bytes()) as client:
        assert len(list(client.datasets.list())) == 1
    with brightrun.Client(address, tls=False, retry=None) as client, pytest.raises(brightrun.UnavailableError):
        list(client.datasets.list())

    monkeypatch.setenv("BRIGHTRUN_TLS_CA", str(certs.ca.cert))
    with brightrun.Client(address) as client:
        assert len(list(client.datasets.list())) == 1

    async def async_call() -> int:
        async with brightrun.AsyncClient(address) as aclient:
            return len([d async for d in aclient.datasets.list()])

    assert asyncio.run(async_call()) == 1
    monkeypatch.delenv("BRIGHTRUN_TLS_CA")

    cli = [sys.executable, "-m", "brightrun.cli", "--target", address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIGHTRUN_TLS")}
    env["BRIGHTRUN_API_KEY"] = TEST_API_KEY
    ok = subprocess.run([*cli, "--tls-ca", str(certs.ca.cert), "datasets", "list", "--json"],
                        env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 1


def test_client_tls_options_are_checked(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client_key"):
        brightrun.Client("127.0.0.1:1", root_certificates=certs.ca.cert, client_cert=certs.client.cert)
    with pytest.raises(ValueError, match="tls=False"):
        brightrun.Client("127.0.0.1:1", tls=False, root_certificates=certs.ca.cert)
    with pytest.raises(ValueError, match="credentials"):
        brightrun.Client("127.0.0.1:1", tls=True, credentials=grpc.ssl_channel_credentials())
    with pytest.raises(FileNotFoundError, match="CA certificate"):
        brightrun.Client("127.0.0.1:1", root_certificates=tmp_path / "missing.pem")


def test_server_tls_settings_are_checked(certs: Certs, tmp_path: Path) -> None:
    base = {"data_dir": tmp_path}
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file together"):
        ServerSettings(**base, tls_cert_file=certs.server.cert)
    with pytest.raises(ValidationError, match="need TLS"):
        ServerSettings(**base, tls_client_ca_file=certs.ca.cert)
    with pytest.raises(ValidationError, match="trainers too"):
        ServerSettings(**base, **tls_settings(certs), tls_client_ca_file=certs.ca.cert)
    assert ServerSettings(**base, **tls_settings(certs, mutual=True)).tls_client_ca_file == certs.ca.cert


@pytest.mark.slow
def test_mutual_tls_a_real_job_completes_and_clients_without_a_trusted_certificate_are_refused(
    tmp_path: Path, certs: Certs, tiny_model: Path
) -> None:
    handle = start_server(tmp_path, trainer_threads=1, heartbeat_seconds=1.0, **tls_settings(certs, mutual=True))
    try:
        address = handle.address
        with brightrun.Client(
            address, root_certificates=certs.ca.cert, client_cert=certs.client.cert, client_key=certs.client.key
        ) as client:
            dataset = client.datasets.upload(EXAMPLES / "support_chat.jsonl")
            job = client.jobs.create(
                dataset=dataset.id,
                base_model=str(tiny_model),
                max_seq_length=512,
                epochs=1,
                max_steps=2,
                batch_size=2,
            )
            done = job.wait(timeout=240)
            assert done.state == brightrun.JobState.COMPLETED, done.state_message
            # The trainer's reports arrived: its metrics and its stages.
            assert [p.step for p in job.metrics() if p.train_loss is not None] == [1, 2]
            spec = json.loads((handle.data_dir / "jobs" / job.id / "attempts" / "1" / "spec.json").read_text())
            assert spec["report"]["tls"] == {
                "ca_file": str(certs.ca.cert),
                "cert_file": str(certs.client.cert),
                "key_file": str(certs.client.key),
            }

        # Every client on the port needs a certificate the server's client CA signed.
        refused = [
            auth_channel(address),
            auth_channel(address, credentials=credentials(certs.ca)),
            auth_channel(address, credentials=credentials(certs.ca, certs.stranger)),
        ]
        for channel in refused:
            with channel, pytest.raises(grpc.RpcError) as failed:
                list_datasets(channel)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        with auth_channel(address, credentials=credentials(certs.ca, certs.client)) as channel:
            assert len(list_datasets(channel).datasets) == 1
            # A certificate is not a token: trainer calls still need the attempt's.
            with pytest.raises(grpc.RpcError) as no_token:
                stubs_over(channel).trainer.ReportAttempt(
                    trainer_service_pb2.ReportAttemptRequest(attempt_id="att_unknown"), timeout=10
                )
            assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop_server(handle)
