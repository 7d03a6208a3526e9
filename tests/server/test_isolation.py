"""Tenant isolation, for every RPC: a key of project "beta" names project
"default"'s jobs, datasets, checkpoints, keys and queue, and gets NOT_FOUND or
only its own data — never the other project's. The table is checked against
the methods the live server serves, so a new RPC without a row fails here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from brightrun.v1 import api_key_service_pb2 as ak
from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import job_pb2
from brightrun.v1 import job_service_pb2 as js
from brightrun.v1 import project_service_pb2 as ps
from brightrun.v1 import queue_service_pb2 as qs
from brightrun.v1 import trainer_service_pb2 as ts
from brightrun_server.domain.caller import Role
from tests.conftest import ServerHandle, start_server, stop_server
from tests.server.conftest import Stubs, attach, details, stubs_for
from tests.server.rpcs import call, served_methods

JUSTIFICATION = "The partner demo moved to tomorrow morning and this is the adapter it shows; " * 2


@dataclass
class World:
    handle: ServerHandle
    alpha: Stubs  # project "default", admin
    beta: Stubs  # project "beta", admin
    dataset_id: str
    running_id: str
    queued_ids: list[str]
    checkpoint_id: str
    key_id: str
    #: Strings that must never reach project beta.
    secrets: list[str]


@pytest.fixture
def world(tmp_path: Path, sleeper: Path) -> Iterator[World]:
    handle = start_server(tmp_path, trainer_python=str(sleeper), stop_grace_seconds=1.0, max_concurrent_jobs=1)
    alpha = stubs_for(handle)
    dataset = alpha.upload_example()
    running = alpha.jobs.CreateJob(
        js.CreateJobRequest(dataset_id=dataset.id, base_model="scripted/model", name="alpha-secret-running")
    )
    alpha.wait_state(running.id, {job_pb2.Job.STATE_PROVISIONING})
    attempt = attach(alpha, running.id)
    attempt.metrics(range(1, 4))
    queued = [
        alpha.jobs.CreateJob(
            js.CreateJobRequest(
                dataset_id=dataset.id, base_model="scripted/model", name=f"alpha-secret-queued-{i}", force=True
            )
        ).id
        for i in range(2)
    ]
    alpha_queue = __import__("brightrun.v1.queue_service_pb2_grpc", fromlist=["x"]).QueueServiceStub(alpha.channel)
    alpha_queue.PromoteJob(
        qs.PromoteJobRequest(job_id=queued[1], reason=qs.PROMOTION_REASON_URGENT_FIX, justification=JUSTIFICATION)
    )
    alpha_key = alpha.new_key("alpha-secret-key")
    assert alpha.keys is not None
    key_id = next(
        k.id for k in alpha.keys.ListApiKeys(ak.ListApiKeysRequest()).api_keys if k.name == "alpha-secret-key"
    )

    _, beta_secret = handle.run(
        handle.app.keys.insert(project="beta", name="beta-admin", role=Role.ADMIN, created_by="test")
    )
    beta = stubs_for(handle, beta_secret)
    own = beta.upload_example()
    beta.jobs.CreateJob(js.CreateJobRequest(dataset_id=own.id, base_model="scripted/model", name="beta-own"))
    yield World(
        handle=handle,
        alpha=alpha,
        beta=beta,
        dataset_id=dataset.id,
        running_id=running.id,
        queued_ids=queued,
        checkpoint_id="ckpt_0000000000000000000000000",
        key_id=key_id,
        secrets=[dataset.id, running.id, *queued, key_id, alpha_key, "alpha-secret"],
    )
    alpha.channel.close()
    beta.channel.close()
    stop_server(handle)


NOT_FOUND = "not_found"
SCOPED = "scoped"
#: Methods with no tenant data, and why.
EXEMPT = {
    "/grpc.health.v1.Health/Check": "serving status only",
    "/grpc.health.v1.Health/List": "serving status only",
    "/grpc.health.v1.Health/Watch": "serving status only",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "the API's shape, the same for everyone",
}

Case = tuple[str, Callable[[World], Any]]

CASES: dict[str, Case] = {
    # Datasets
    "/brightrun.v1.DatasetService/UploadDataset": (
        SCOPED,
        lambda w: ds.UploadDatasetRequest(
            metadata=ds.UploadDatasetMetadata(filename="x.jsonl", request_id=w.dataset_id)
        ),
    ),
    "/brightrun.v1.DatasetService/GetDataset": (NOT_FOUND, lambda w: ds.GetDatasetRequest(dataset_id=w.dataset_id)),
    "/brightrun.v1.DatasetService/ListDatasets": (SCOPED, lambda w: ds.ListDatasetsRequest()),
    "/brightrun.v1.DatasetService/DeleteDataset": (
        NOT_FOUND,
        lambda w: ds.DeleteDatasetRequest(dataset_id=w.dataset_id),
    ),
    "/brightrun.v1.DatasetService/ValidateDataset": (
        NOT_FOUND,
        lambda w: ds.ValidateDatasetRequest(dataset_id=w.dataset_id),
    ),
    "/brightrun.v1.DatasetService/ListValidationErrors": (
        NOT_FOUND,
        lambda w: ds.ListValidationErrorsRequest(dataset_id=w.dataset_id),
    ),
    "/brightrun.v1.DatasetService/ExportValidationErrors": (
        NOT_FOUND,
        lambda w: ds.ExportValidationErrorsRequest(dataset_id=w.dataset_id),
    ),
    # Jobs
    "/brightrun.v1.JobService/CreateJob": (
        NOT_FOUND,
        lambda w: js.CreateJobRequest(dataset_id=w.dataset_id, base_model="scripted/model"),
    ),
    "/brightrun.v1.JobService/GetJob": (NOT_FOUND, lambda w: js.GetJobRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/ListJobs": (SCOPED, lambda w: js.ListJobsRequest()),
    "/brightrun.v1.JobService/CancelJob": (
        NOT_FOUND,
        lambda w: js.CancelJobRequest(job_id=w.running_id, reason=job_pb2.CANCEL_REASON_TESTING),
    ),
    "/brightrun.v1.JobService/StreamJobMetrics": (
        NOT_FOUND,
        lambda w: js.StreamJobMetricsRequest(job_id=w.running_id),
    ),
    "/brightrun.v1.JobService/StreamJobEvents": (NOT_FOUND, lambda w: js.StreamJobEventsRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/WatchJob": (NOT_FOUND, lambda w: js.WatchJobRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/ListJobMetrics": (NOT_FOUND, lambda w: js.ListJobMetricsRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/ListJobEvents": (NOT_FOUND, lambda w: js.ListJobEventsRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/EstimateJob": (
        NOT_FOUND,
        lambda w: js.EstimateJobRequest(dataset_id=w.dataset_id, base_model="Qwen/Qwen2.5-0.5B"),
    ),
    "/brightrun.v1.JobService/PauseJob": (NOT_FOUND, lambda w: js.PauseJobRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/ResumeJob": (NOT_FOUND, lambda w: js.ResumeJobRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/RetryJob": (NOT_FOUND, lambda w: js.RetryJobRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/SuggestFixes": (NOT_FOUND, lambda w: js.SuggestFixesRequest(job_id=w.running_id)),
    "/brightrun.v1.JobService/ResumeFromCheckpoint": (
        NOT_FOUND,
        lambda w: js.ResumeFromCheckpointRequest(job_id=w.running_id, checkpoint_id=w.checkpoint_id),
    ),
    "/brightrun.v1.JobService/GetFailureReport": (
        NOT_FOUND,
        lambda w: js.GetFailureReportRequest(job_id=w.running_id),
    ),
    "/brightrun.v1.JobService/DecideRecovery": (
        NOT_FOUND,
        lambda w: js.DecideRecoveryRequest(job_id=w.running_id, choice=job_pb2.RECOVERY_CHOICE_CANCEL),
    ),
    "/brightrun.v1.JobService/ListJobCheckpoints": (
        NOT_FOUND,
        lambda w: js.ListJobCheckpointsRequest(job_id=w.running_id),
    ),
    "/brightrun.v1.JobService/SwitchToOnDemand": (
        NOT_FOUND,
        lambda w: js.SwitchToOnDemandRequest(job_id=w.queued_ids[0]),
    ),
    "/brightrun.v1.JobService/ExportJobs": (SCOPED, lambda w: js.ExportJobsRequest()),
    "/brightrun.v1.JobService/BulkCancelJobs": (
        SCOPED,
        lambda w: js.BulkCancelJobsRequest(
            job_ids=[w.running_id, *w.queued_ids], filter="state = QUEUED", reason=job_pb2.CANCEL_REASON_TESTING
        ),
    ),
    # Queue
    "/brightrun.v1.QueueService/GetQueue": (SCOPED, lambda w: qs.GetQueueRequest()),
    "/brightrun.v1.QueueService/WatchQueue": (SCOPED, lambda w: qs.WatchQueueRequest()),
    "/brightrun.v1.QueueService/PromoteJob": (
        NOT_FOUND,
        lambda w: qs.PromoteJobRequest(
            job_id=w.queued_ids[0], reason=qs.PROMOTION_REASON_URGENT_FIX, justification=JUSTIFICATION
        ),
    ),
    "/brightrun.v1.QueueService/ListQueueAudit": (SCOPED, lambda w: qs.ListQueueAuditRequest()),
    # Projects
    "/brightrun.v1.ProjectService/GetUsage": (SCOPED, lambda w: ps.GetUsageRequest()),
    # Keys
    "/brightrun.v1.ApiKeyService/CreateApiKey": (SCOPED, lambda w: ak.CreateApiKeyRequest(name="beta-ci")),
    "/brightrun.v1.ApiKeyService/ListApiKeys": (SCOPED, lambda w: ak.ListApiKeysRequest(show_revoked=True)),
    "/brightrun.v1.ApiKeyService/RevokeApiKey": (NOT_FOUND, lambda w: ak.RevokeApiKeyRequest(api_key_id=w.key_id)),
    "/brightrun.v1.ApiKeyService/GetCaller": (SCOPED, lambda w: ak.GetCallerRequest()),
    # The trainer's channel: an attempt token, never an API key, opens it.
    "/brightrun.v1.TrainerService/ReportAttempt": (
        "attempt_token",
        lambda w: ts.ReportAttemptRequest(attempt_id="att_0000000000000000000000000"),
    ),
}


def _text(response: Any) -> str:
    items = response if isinstance(response, list) else [response]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
            continue
        out.append(json.dumps(json_format.MessageToDict(item)))
        chunk = getattr(item, "chunk", b"") or getattr(item, "data", b"")
        if isinstance(chunk, bytes):
            out.append(chunk.decode(errors="replace"))
    return "\n".join(out)


def test_isolation_table_covers_every_served_method(stubs: Stubs) -> None:
    served = set(served_methods(stubs.channel))
    assert set(CASES) | set(EXEMPT) == served, "each RPC needs an isolation case (or an exemption with a reason)"


def test_another_projects_resources_are_not_found_and_never_shown(world: World) -> None:
    methods = served_methods(world.beta.channel)
    before = {job_id: world.alpha.get_job(job_id).state for job_id in [world.running_id, *world.queued_ids]}
    for path, (expect, build) in CASES.items():
        rpc = methods[path]
        request = build(world)
        if expect == NOT_FOUND:
            with pytest.raises(grpc.RpcError) as caught:
                call(world.beta.channel, rpc, request, timeout=5, max_items=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (path, caught.value.details())
            info, _ = details(caught.value)
            assert info.reason.endswith("_NOT_FOUND"), path
            asked = json.dumps(json_format.MessageToDict(request))
            leaked = [s for s in world.secrets if s in (caught.value.details() or "") and s not in asked]
            assert not leaked, (path, leaked)
        elif expect == SCOPED:
            code, response = grpc.StatusCode.OK, []
            try:
                response = call(world.beta.channel, rpc, request, timeout=3, max_items=2)
            except grpc.RpcError as e:
                code, response = e.code(), [e.details() or ""]
            # A stream with nothing more to say within the deadline is fine;
            # an error must not name the other project's data either.
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT), (
                path,
                code,
            )
            shown = _text(response)
            # Echoing what the caller sent is no leak; anything else of alpha's is.
            asked = json.dumps(json_format.MessageToDict(request))
            leaked = [s for s in world.secrets if s in shown and s not in asked]
            assert not leaked, (path, leaked)
            if path.endswith("/BulkCancelJobs"):
                theirs = [r for r in response.results if r.job_id in world.secrets]
                assert [r.state for r in theirs] == [job_pb2.Job.STATE_UNSPECIFIED] * 3
                assert all("not found" in r.error for r in theirs)
                # The filter matched beta's own queued job only.
                assert len(response.results) == 4
        else:
            with pytest.raises(grpc.RpcError) as caught:
                call(world.beta.channel, rpc, request, timeout=5)
            assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND), path
    # Nothing beta tried changed alpha's jobs, dataset or keys.
    after = {job_id: world.alpha.get_job(job_id).state for job_id in [world.running_id, *world.queued_ids]}
    assert after == before
    world.alpha.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=world.dataset_id))
    assert world.alpha.keys is not None
    alive = {k.id for k in world.alpha.keys.ListApiKeys(ak.ListApiKeysRequest()).api_keys}
    assert world.key_id in alive
    # And beta does see its own: the scoping is not an empty answer for everyone.
    own = world.beta.jobs.ListJobs(js.ListJobsRequest())
    assert [j.name for j in own.jobs] == ["beta-own"]
    assert world.beta.keys is not None
    assert world.beta.keys.GetCaller(ak.GetCallerRequest()).project == "beta"


def test_request_ids_are_per_project(world: World) -> None:
    """Beta replaying alpha's request ids gets its own resources (or its own
    error), never alpha's dataset or job."""
    data = (Path(__file__).resolve().parents[2] / "examples" / "data" / "support_chat.jsonl").read_bytes()
    mine = world.alpha.upload(data, filename="a.jsonl", request_id="shared-upload")
    again = world.alpha.upload(data, filename="a.jsonl", request_id="shared-upload")
    assert again.id == mine.id
    theirs = world.beta.upload(data, filename="a.jsonl", request_id="shared-upload")
    assert theirs.id != mine.id
    assert world.beta.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=theirs.id)).id == theirs.id

    request = js.CreateJobRequest(
        dataset_id=mine.id, base_model="scripted/model", name="alpha-secret-idem", request_id="shared", force=True
    )
    job = world.alpha.jobs.CreateJob(request)
    assert world.alpha.jobs.CreateJob(request).id == job.id
    # Alpha's very request, replayed by beta: alpha's dataset is not found; no job of alpha's comes back.
    with pytest.raises(grpc.RpcError) as caught:
        world.beta.jobs.CreateJob(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in (caught.value.details() or "")
    # The same request id on beta's own dataset: a new job of beta's.
    beta_job = world.beta.jobs.CreateJob(
        js.CreateJobRequest(dataset_id=theirs.id, base_model="scripted/model", request_id="shared", force=True)
    )
    assert beta_job.id != job.id
