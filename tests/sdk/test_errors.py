"""Error mapping against a real server: typed exceptions with reason, metadata,
field violations; every out-of-range CreateJob override named; idempotency."""

from __future__ import annotations

import pickle
import uuid

import grpc
import pytest

import brightrun
from brightrun.errors import ApiError, error_class, from_status

#: (override, an out-of-range value, text the violation must contain).
OUT_OF_RANGE = [
    ("lora_rank", 3, "between 4 and 64"),
    ("lora_rank", 65, "between 4 and 64"),
    ("lora_alpha", 7, "between 8 and 128"),
    ("lora_alpha", 129, "between 8 and 128"),
    ("lora_dropout", -0.01, "between 0 and 0.2"),
    ("lora_dropout", 0.21, "between 0 and 0.2"),
    ("epochs", 0, "between 1 and 10"),
    ("epochs", 11, "between 1 and 10"),
    ("batch_size", 3, "one of 1, 2, 4, 8"),
    ("batch_size", 16, "one of 1, 2, 4, 8"),
    ("warmup_ratio", -0.1, "between 0 and 0.1"),
    ("warmup_ratio", 0.11, "between 0 and 0.1"),
    ("max_seq_length", 256, "one of 512, 1024, 2048, 4096"),
    ("max_seq_length", 8192, "one of 512, 1024, 2048, 4096"),
    ("learning_rate", 0.0, "above 0 and at most 0.01"),
    ("learning_rate", -1e-4, "above 0 and at most 0.01"),
    ("learning_rate", 0.011, "above 0 and at most 0.01"),
]


def test_unknown_job_is_not_found(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.NotFoundError) as info:
        client.jobs.get("job_does_not_exist")
    e = info.value
    assert e.code is grpc.StatusCode.NOT_FOUND
    assert e.reason == "JOB_NOT_FOUND"
    assert e.domain == "brightrun.dev"
    assert e.metadata == {"job_id": "job_does_not_exist"}
    assert str(e) == "job 'job_does_not_exist' not found (JOB_NOT_FOUND)"
    assert e.retry_delay is None
    assert e.field_violations == []


def test_unknown_dataset_is_not_found(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.NotFoundError) as info:
        client.datasets.get("ds_missing")
    assert info.value.reason == "DATASET_NOT_FOUND"
    assert info.value.metadata == {"dataset_id": "ds_missing"}


def test_create_on_unknown_dataset_is_not_found(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.NotFoundError) as info:
        client.jobs.create(dataset="ds_missing", base_model="some/model", force=True)
    assert info.value.reason == "DATASET_NOT_FOUND"


@pytest.mark.parametrize(("field", "value", "expected"), OUT_OF_RANGE)
def test_every_out_of_range_override_is_named(
    client: brightrun.Client, idle_dataset: brightrun.Dataset, field: str, value: float, expected: str
) -> None:
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, **{field: value})
    e = info.value
    assert e.reason == "INVALID_ARGUMENT"
    assert [v.field for v in e.field_violations] == [f"overrides.{field}"]
    assert expected in e.field_violations[0].description
    assert f"overrides.{field}" in str(e)


def test_all_violations_are_reported_at_once(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        client.jobs.create(dataset=idle_dataset, base_model="", lora_rank=99, epochs=0, batch_size=3)
    fields = {v.field for v in info.value.field_violations}
    assert fields == {"base_model", "overrides.lora_rank", "overrides.epochs", "overrides.batch_size"}


@pytest.mark.parametrize(("field", "value", "_"), OUT_OF_RANGE[:4])
async def test_async_client_maps_errors_the_same(
    aclient: brightrun.AsyncClient, idle_dataset: brightrun.Dataset, field: str, value: float, _: str
) -> None:
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        await aclient.jobs.create(dataset=idle_dataset.id, base_model="some/model", force=True, **{field: value})
    assert [v.field for v in info.value.field_violations] == [f"overrides.{field}"]
    with pytest.raises(brightrun.NotFoundError) as missing:
        await aclient.jobs.get("job_nope")
    assert missing.value.reason == "JOB_NOT_FOUND"


def test_unknown_override_is_a_client_side_type_error(client: brightrun.Client) -> None:
    with pytest.raises(TypeError, match=r"'lora_rnk' \(did you mean 'lora_rank'\?\); allowed: lora_rank"):
        client.jobs.create(dataset="ds_x", base_model="m", lora_rnk=8)
    with pytest.raises(TypeError, match="lora_rank"):
        client.jobs.create(dataset="ds_x", base_model="m", lora_rank="eight")


def test_same_request_id_returns_the_same_job(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    key = f"test-{uuid.uuid4()}"
    first = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, request_id=key, lora_rank=8)
    second = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, request_id=key, lora_rank=8)
    assert first.id == second.id
    assert second.request_id == key


def test_same_request_id_different_params_is_refused(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    key = f"test-{uuid.uuid4()}"
    job = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, request_id=key)
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True, request_id=key, lora_rank=8)
    e = info.value
    assert e.reason == "REQUEST_ID_REUSED"
    assert e.metadata == {"request_id": key, "job_id": job.id}
    assert e.field_violations[0].field == "request_id"


def test_sdk_fills_a_request_id(client: brightrun.Client, idle_dataset: brightrun.Dataset) -> None:
    job = client.jobs.create(dataset=idle_dataset, base_model="some/model", force=True)
    assert uuid.UUID(job.request_id)


def test_cancel_needs_a_known_reason(client: brightrun.Client) -> None:
    with pytest.raises(ValueError, match="expected one of loss_not_decreasing"):
        client.jobs.cancel("job_x", reason="bored")
    with pytest.raises(ValueError, match="a cancel reason is required"):
        client.jobs.cancel("job_x", reason="unspecified")


def test_bad_filter_is_invalid_argument(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.InvalidArgumentError) as info:
        list(client.jobs.list(filter="state ~~ nonsense"))
    assert info.value.reason == "FILTER_INVALID"


def test_every_status_code_has_its_class() -> None:
    codes = {code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}
    classes = {code: error_class(code) for code in codes}
    assert all(cls is not ApiError for cls in classes.values())
    assert len(set(classes.values())) == len(codes)
    for code, cls in classes.items():
        assert issubclass(cls, brightrun.BrightRunError)
        assert cls.grpc_status_code is code


def test_errors_pickle_with_their_details(client: brightrun.Client) -> None:
    with pytest.raises(brightrun.NotFoundError) as info:
        client.jobs.get("job_pickled")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is brightrun.NotFoundError
    assert (copy.reason, copy.metadata, str(copy)) == (info.value.reason, info.value.metadata, str(info.value))


def test_internal_errors_expose_the_request_id() -> None:
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain="brightrun.dev", metadata={"request_id": "r-42"}))
    error = from_status(status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[info]))
    assert isinstance(error, brightrun.InternalError)
    assert error.request_id == "r-42"
    assert str(error) == "internal error (INTERNAL) [request id r-42]"
