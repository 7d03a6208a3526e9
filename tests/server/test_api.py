"""The public gRPC API over the wire: datasets, job creation and its errors,
idempotency, listing, health and reflection. Most run on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from brightrun.v1 import dataset_pb2, job_pb2
from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import job_service_pb2 as js
from tests.conftest import EXAMPLES, ServerHandle
from tests.server.conftest import Stubs, details

CHAT = (EXAMPLES / "support_chat.jsonl").read_bytes()


def create(stubs: Stubs, dataset_id: str, **fields: object) -> job_pb2.Job:
    base_model = str(fields.pop("base_model", "org/model"))
    request = js.CreateJobRequest(dataset_id=dataset_id, base_model=base_model, **fields)
    job: job_pb2.Job = stubs.jobs.CreateJob(request)
    return job


# ---------------------------------------------------------------- datasets


def test_upload_get_list_delete(any_stubs: Stubs, any_server: ServerHandle) -> None:
    s = any_stubs
    d = s.upload(CHAT, filename="support_chat.jsonl", size_bytes=len(CHAT), sha256=hashlib.sha256(CHAT).hexdigest())
    assert d.id.startswith("ds_")
    assert d.state == dataset_pb2.Dataset.STATE_READY
    assert d.format == dataset_pb2.DATASET_FORMAT_CHAT_JSONL
    assert d.size_bytes == len(CHAT)
    assert d.sha256 == hashlib.sha256(CHAT).hexdigest()
    assert d.stats.conversations == d.stats.training_pairs == CHAT.count(b"\n")
    assert d.validation.critical_count == 0
    assert s.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=d.id)) == d
    listed = s.datasets.ListDatasets(ds.ListDatasetsRequest())
    assert [x.id for x in listed.datasets] == [d.id]
    s.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=d.id))
    with pytest.raises(grpc.RpcError) as caught:
        s.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=d.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[0].reason == "DATASET_NOT_FOUND"
    assert not (any_server.data_dir / "datasets" / d.id).exists()


def test_upload_integrity_is_checked_and_nothing_is_kept_on_mismatch(stubs: Stubs, server: ServerHandle) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.upload(CHAT, sha256="0" * 64)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(caught.value)
    assert info.reason == "UPLOAD_CORRUPTED"
    assert info.metadata["actual"] == hashlib.sha256(CHAT).hexdigest()
    with pytest.raises(grpc.RpcError) as caught:
        stubs.upload(CHAT, size_bytes=len(CHAT) + 1)
    assert details(caught.value)[0].reason == "UPLOAD_CORRUPTED"
    assert list(stubs.datasets.ListDatasets(ds.ListDatasetsRequest()).datasets) == []
    assert [p.name for p in (server.data_dir / "datasets").iterdir()] == []


def test_upload_stream_must_start_with_metadata(stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.datasets.UploadDataset(iter([ds.UploadDatasetRequest(chunk=b"{}")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1][0][0] == "metadata"
    with pytest.raises(grpc.RpcError) as caught:
        stubs.datasets.UploadDataset(iter([]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_request_id_makes_retries_idempotent(stubs: Stubs) -> None:
    first = stubs.upload(CHAT, request_id="upload-1")
    again = stubs.upload(CHAT, request_id="upload-1")
    assert again.id == first.id
    assert len(stubs.datasets.ListDatasets(ds.ListDatasetsRequest()).datasets) == 1


def test_invalid_dataset_is_stored_but_blocks_job_creation(stubs: Stubs) -> None:
    broken = CHAT + b'{"messages": [{"role": "user"}]}\n{not json}\n'
    d = stubs.upload(broken)
    assert d.state == dataset_pb2.Dataset.STATE_INVALID
    assert d.validation.critical_count >= 1
    assert d.validation.first_errors
    with pytest.raises(grpc.RpcError) as caught:
        create(stubs, d.id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(caught.value)
    assert info.reason == "DATASET_INVALID"
    assert info.metadata["critical_count"] == str(d.validation.critical_count)
    assert f"{d.validation.critical_count} critical" in caught.value.details()


def test_dataset_in_use_cannot_be_deleted(stubs: Stubs) -> None:
    d = stubs.upload(CHAT)
    job = create(stubs, d.id, base_model="/nonexistent/model")
    with pytest.raises(grpc.RpcError) as caught:
        stubs.datasets.DeleteDataset(ds.DeleteDatasetRequest(dataset_id=d.id))
    if caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION:
        info, _ = details(caught.value)
        assert info.reason == "DATASET_IN_USE"
        assert job.id in info.metadata["job_ids"]
    assert stubs.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=d.id)).id == d.id


# ---------------------------------------------------------------- jobs: bad input

OUT_OF_RANGE = [
    ("lora_rank", 3),
    ("lora_rank", 65),
    ("lora_alpha", 7),
    ("lora_alpha", 129),
    ("lora_dropout", 0.25),
    ("lora_dropout", -0.1),
    ("epochs", 0),
    ("epochs", 11),
    ("batch_size", 3),
    ("batch_size", 16),
    ("warmup_ratio", 0.2),
    ("max_seq_length", 1000),
    ("max_seq_length", 8192),
    ("learning_rate", 0.0),
    ("learning_rate", 0.5),
    ("gradient_accumulation_steps", 0),
    ("checkpoint_interval_steps", 0),
    ("validation_split", 0.9),
]


@pytest.fixture
def dataset_id(stubs: Stubs) -> str:
    return str(stubs.upload(CHAT).id)


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_every_out_of_range_override_is_rejected_naming_the_field(
    stubs: Stubs, dataset_id: str, field: str, value: float
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        create(stubs, dataset_id, overrides=job_pb2.TrainingConfig(**{field: value}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = details(caught.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in violations] == [f"overrides.{field}"]
    assert "must be" in violations[0][1]
    assert list(stubs.jobs.ListJobs(js.ListJobsRequest()).jobs) == [], "nothing stored"


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"base_model": ""}, "base_model"),
        ({"request_id": "has spaces"}, "request_id"),
        ({"name": "x" * 300}, "name"),
        ({"compute": job_pb2.ComputeConfig(gpu_type="TPU-9000")}, "compute.gpu_type"),
        ({"compute": job_pb2.ComputeConfig(max_duration=duration_pb2.Duration(seconds=1))}, "compute.max_duration"),
        ({"labels": {"Bad Key": "x"}}, "labels.Bad Key"),
        ({"preset": 99}, "preset"),
        ({"overrides": job_pb2.TrainingConfig(quantization=42)}, "overrides.quantization"),
        ({"overrides": job_pb2.TrainingConfig(target_modules=["bad module"])}, "overrides.target_modules"),
    ],
)
def test_other_bad_fields_are_named(stubs: Stubs, dataset_id: str, fields: dict[str, object], bad_field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        create(stubs, dataset_id, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field in [f for f, _ in details(caught.value)[1]]


def test_unknown_dataset_and_job_are_not_found(stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        create(stubs, "ds_missing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = details(caught.value)
    assert (info.reason, info.metadata["dataset_id"]) == ("DATASET_NOT_FOUND", "ds_missing")
    for call in (
        lambda: stubs.jobs.GetJob(js.GetJobRequest(job_id="job_missing")),
        lambda: stubs.jobs.CancelJob(js.CancelJobRequest(job_id="job_missing", reason=job_pb2.CANCEL_REASON_OTHER)),
        lambda: list(stubs.jobs.StreamJobMetrics(js.StreamJobMetricsRequest(job_id="job_missing"))),
        lambda: list(stubs.jobs.StreamJobEvents(js.StreamJobEventsRequest(job_id="job_missing"))),
        lambda: list(stubs.jobs.WatchJob(js.WatchJobRequest(job_id="job_missing"))),
        lambda: stubs.jobs.ListJobMetrics(js.ListJobMetricsRequest(job_id="job_missing")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(caught.value)[0].reason == "JOB_NOT_FOUND"


def test_cancel_needs_a_reason_and_a_short_note(stubs: Stubs, dataset_id: str) -> None:
    job = create(stubs, dataset_id)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id))
    assert [f for f, _ in details(caught.value)[1]] == ["reason"]
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_OTHER, note="x" * 501))
    assert [f for f, _ in details(caught.value)[1]] == ["note"]


# ---------------------------------------------------------------- jobs: creation


def test_created_job_is_complete_and_resolved(any_stubs: Stubs) -> None:
    d = any_stubs.upload(CHAT)
    job = create(
        any_stubs,
        d.id,
        base_model="/nonexistent/model",
        preset=job_pb2.PRESET_CONSERVATIVE,
        overrides=job_pb2.TrainingConfig(batch_size=8, max_seq_length=512),
        compute=job_pb2.ComputeConfig(pricing_tier=job_pb2.PRICING_TIER_ON_DEMAND),
        labels={"team": "search"},
    )
    assert job.id.startswith("job_")
    assert job.preset == job_pb2.PRESET_CONSERVATIVE
    assert job.custom is True
    c = job.config
    assert (c.lora_rank, c.lora_alpha, c.learning_rate, c.epochs) == (8, 16, 1e-4, 2)
    assert (c.batch_size, c.max_seq_length) == (8, 512)
    assert c.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE
    assert list(c.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert job.compute.gpu_type == "H100-80GB"
    assert job.cost.hourly_rate_usd == 7.99
    assert job.compute.max_duration.seconds == 24 * 3600
    assert dict(job.labels) == {"team": "search"}
    assert len(job.config_fingerprint) == 32
    assert job.state == job_pb2.Job.STATE_QUEUED
    assert job.version >= 1


def test_same_request_id_returns_the_same_job_and_different_params_are_refused(any_stubs: Stubs) -> None:
    d = any_stubs.upload(CHAT)
    first = create(any_stubs, d.id, request_id="req-7", base_model="/nonexistent/a")
    again = create(any_stubs, d.id, request_id="req-7", base_model="/nonexistent/a")
    assert again.id == first.id
    with pytest.raises(grpc.RpcError) as caught:
        create(any_stubs, d.id, request_id="req-7", base_model="/nonexistent/b")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = details(caught.value)
    assert info.reason == "REQUEST_ID_REUSED"
    assert info.metadata["job_id"] == first.id
    assert violations[0][0] == "request_id"


def test_one_hundred_concurrent_creates_with_one_request_id_make_one_job(any_stubs: Stubs) -> None:
    d = any_stubs.upload(CHAT)
    request = js.CreateJobRequest(request_id="burst", dataset_id=d.id, base_model="/nonexistent/model")
    with ThreadPoolExecutor(32) as pool:
        ids = set(pool.map(lambda _: any_stubs.jobs.CreateJob(request).id, range(100)))
    assert len(ids) == 1
    assert len(any_stubs.jobs.ListJobs(js.ListJobsRequest(page_size=1000)).jobs) == 1


# ---------------------------------------------------------------- listing


def test_cancel_racing_worker_launches_never_deadlocks(any_stubs: Stubs) -> None:
    """CancelJob locks a job, then its attempt; the scheduler recording a just-
    launched worker (and a trainer's reports) once locked the attempt first, and
    on PostgreSQL the two deadlocked: INTERNAL for the caller. Cancel jobs as
    their workers start, many times; every cancel must succeed."""
    d = any_stubs.upload(CHAT)
    for round_ in range(6):
        jobs = [
            create(any_stubs, d.id, name=f"race {round_}.{i}", base_model="/nonexistent/model", force=True)
            for i in range(8)
        ]
        for job in jobs:
            any_stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_TESTING))
        for job in jobs:
            any_stubs.wait_state(job.id, {job_pb2.Job.STATE_CANCELLED})


def test_list_jobs_pages_filters_and_rejects_foreign_tokens(any_stubs: Stubs) -> None:
    d = any_stubs.upload(CHAT)
    created = [
        create(
            any_stubs, d.id, name=f"job {i}", base_model="/nonexistent/model", labels={"batch": str(i % 2)}, force=True
        )
        for i in range(7)
    ]
    # Queued jobs are claimed by the scheduler; cancel them so states are stable.
    for job in created:
        any_stubs.jobs.CancelJob(js.CancelJobRequest(job_id=job.id, reason=job_pb2.CANCEL_REASON_TESTING))
    for job in created:  # claimed ones pass through CANCELLING while their worker stops
        any_stubs.wait_state(job.id, {job_pb2.Job.STATE_CANCELLED})
    seen: list[str] = []
    token = ""
    while True:
        page = any_stubs.jobs.ListJobs(js.ListJobsRequest(page_size=3, page_token=token))
        assert len(page.jobs) <= 3
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.id for j in reversed(created)], "newest first, each exactly once"
    odd = any_stubs.jobs.ListJobs(js.ListJobsRequest(filter='labels.batch = "1"'))
    assert {j.id for j in odd.jobs} == {j.id for i, j in enumerate(created) if i % 2}
    named = any_stubs.jobs.ListJobs(js.ListJobsRequest(filter='name = "job 3"'))
    assert [j.id for j in named.jobs] == [created[3].id]
    cancelled = any_stubs.jobs.ListJobs(js.ListJobsRequest(filter="state = CANCELLED AND dataset_id = " + d.id))
    assert len(cancelled.jobs) == 7
    first = any_stubs.jobs.ListJobs(js.ListJobsRequest(page_size=2))
    foreign = js.ListJobsRequest(page_size=2, page_token=first.next_page_token, filter="state = QUEUED")
    with pytest.raises(grpc.RpcError) as caught:
        any_stubs.jobs.ListJobs(foreign)
    assert details(caught.value)[0].reason == "PAGE_TOKEN_INVALID"
    with pytest.raises(grpc.RpcError) as caught:
        any_stubs.jobs.ListJobs(js.ListJobsRequest(filter="colour = red"))
    info, violations = details(caught.value)
    assert info.reason == "FILTER_INVALID"
    assert "unknown field 'colour'" in violations[0][1]
    with pytest.raises(grpc.RpcError) as caught:
        any_stubs.jobs.ListJobs(js.ListJobsRequest(page_size=-1))
    assert details(caught.value)[1][0][0] == "page_size"


# ---------------------------------------------------------------- standard services


def test_health_and_reflection(stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "brightrun.v1.JobService", "brightrun.v1.DatasetService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"brightrun.v1.JobService", "brightrun.v1.DatasetService", "grpc.health.v1.Health"} <= names


def test_unexpected_errors_are_internal_with_a_request_id(stubs: Stubs, server: ServerHandle) -> None:
    import sqlalchemy as sa

    d = stubs.upload(CHAT)
    # Corrupt a stored row so conversion fails: an honest "bug" the client must see as INTERNAL.
    engine = sa.create_engine(server.database_url)
    with engine.begin() as conn:
        update = sa.text("UPDATE datasets SET stats = :s WHERE id = :id")
        conn.execute(update, {"s": json.dumps("not a dict"), "id": d.id})
    engine.dispose()
    with pytest.raises(grpc.RpcError) as caught:
        stubs.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=d.id), metadata=(("x-request-id", "req-abc"),))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    info, _ = details(caught.value)
    assert info.reason == "INTERNAL"
    assert info.metadata["request_id"] == "req-abc"
    assert "req-abc" in caught.value.details()


def test_nul_characters_are_refused_by_field_and_search_is_literal(any_stubs: Stubs) -> None:
    """PostgreSQL text cannot hold NUL: every string field is checked before any
    handler runs, and the refusal names the field. Search text is matched
    literally (% and _ are no wildcards) and bounded."""
    dataset = any_stubs.upload_example()
    with pytest.raises(grpc.RpcError) as refused:
        any_stubs.jobs.CreateJob(
            js.CreateJobRequest(dataset_id=dataset.id, base_model="some/model", name="a\x00b", labels={"team": "x\x00"})
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = details(refused.value)
    assert sorted(field for field, _ in violations) == ["labels['team']", "name"]
    with pytest.raises(grpc.RpcError) as missing:
        any_stubs.jobs.GetJob(js.GetJobRequest(job_id="job_\x00"))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("50% off", "plain_name"):
        any_stubs.jobs.CreateJob(
            js.CreateJobRequest(dataset_id=dataset.id, base_model="some/model", name=name, force=True)
        )
    found = any_stubs.jobs.ListJobs(js.ListJobsRequest(query="50%")).jobs
    assert [j.name for j in found] == ["50% off"]
    assert any_stubs.jobs.ListJobs(js.ListJobsRequest(query="n_m")).jobs == []
    assert [j.name for j in any_stubs.jobs.ListJobs(js.ListJobsRequest(query="n_n")).jobs] == ["plain_name"]
    with pytest.raises(grpc.RpcError) as long_search:
        any_stubs.jobs.ListJobs(js.ListJobsRequest(query="%" * 5000))
    assert long_search.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(long_search.value)[1][0][0] == "query"
