"""EstimateJob and the estimate CreateJob stores: risk, fixes, refusal and acknowledgement."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from brightrun.v1 import job_pb2
from brightrun.v1 import job_service_pb2 as js
from tests.conftest import EXAMPLES
from tests.server.conftest import Stubs, details

GIB = 1024**3
BIG = "meta-llama/Llama-3.1-70B"


def test_a_70b_model_in_16_bit_does_not_fit_an_80gb_gpu_and_the_fixes_say_why(stubs: Stubs) -> None:
    response = stubs.jobs.EstimateJob(js.EstimateJobRequest(base_model=BIG))
    e = response.estimate
    assert e.gpu_type == "H100-80GB"
    assert 79 * GIB < e.capacity_bytes < 81 * GIB
    assert e.oom_risk == job_pb2.OOM_RISK_HIGH
    assert e.total_bytes > e.capacity_bytes
    assert e.shortage_bytes == e.total_bytes - e.capacity_bytes
    assert sum(m.bytes for m in e.memory) >= 0.95 * e.total_bytes
    names = " ".join(m.name.lower() for m in e.memory)
    for part in ("base model", "optimizer", "activation", "lora adapters", "gradients"):
        assert part in names
    assert e.fixes, "a high-risk estimate comes with fixes"
    assert all(f.predicted_total_bytes < e.total_bytes for f in e.fixes)
    kinds = [f.kind for f in e.fixes]
    assert any("4bit" in k or "quant" in k for k in kinds), kinds
    assert not e.HasField("duration"), "no dataset, no duration"


def test_create_refuses_high_risk_unless_acknowledged(stubs: Stubs) -> None:
    dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes())
    request = js.CreateJobRequest(dataset_id=dataset.id, base_model=BIG)
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.CreateJob(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(caught.value)
    assert info.reason == "OOM_RISK_HIGH"
    assert int(info.metadata["total_bytes"]) > int(info.metadata["capacity_bytes"])
    assert info.metadata["top_fix"]
    assert "top fix" in caught.value.details()
    assert list(stubs.jobs.ListJobs(js.ListJobsRequest()).jobs) == []

    request.acknowledge_oom_risk = True
    job = stubs.jobs.CreateJob(request)
    assert job.estimate.oom_risk == job_pb2.OOM_RISK_HIGH
    assert job.estimate.HasField("duration")
    assert job.estimate.duration.hours.low <= job.estimate.duration.hours.high
    spot, on_demand = job.estimate.cost_spot, job.estimate.cost_on_demand
    assert 0 < spot.total_usd.low <= spot.total_usd.high
    assert spot.total_usd.high < on_demand.total_usd.high
    assert {line.name.lower().split()[0] for line in spot.lines} >= {"storage"}


def test_quantized_config_fits_and_the_estimate_is_stored(stubs: Stubs) -> None:
    dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes())
    job = stubs.jobs.CreateJob(
        js.CreateJobRequest(
            dataset_id=dataset.id,
            base_model="meta-llama/Llama-3.1-8B",
            overrides=job_pb2.TrainingConfig(quantization=job_pb2.QUANTIZATION_NF4, max_seq_length=1024),
        )
    )
    assert job.estimate.oom_risk == job_pb2.OOM_RISK_LOW
    assert job.estimate.token_source.startswith("approximate")
    assert job.estimate.trainable_parameters > 0
    assert list(job.estimate.fixes) == []
    assert stubs.get_job(job.id).estimate == job.estimate


def test_local_model_directories_are_estimated_from_their_config(stubs: Stubs, tiny_model: Path) -> None:
    e = stubs.jobs.EstimateJob(js.EstimateJobRequest(base_model=str(tiny_model))).estimate
    assert e.oom_risk == job_pb2.OOM_RISK_LOW
    assert 0 < e.total_bytes < GIB


def test_unknown_models_and_bad_fields_are_named(stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.EstimateJob(js.EstimateJobRequest(base_model="nobody/never-heard-of-it"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = details(caught.value)
    assert info.reason == "MODEL_UNKNOWN"
    assert violations[0][0] == "base_model"
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.EstimateJob(
            js.EstimateJobRequest(base_model=BIG, overrides=job_pb2.TrainingConfig(lora_rank=1, batch_size=5))
        )
    assert {f for f, _ in details(caught.value)[1]} == {"overrides.lora_rank", "overrides.batch_size"}
    with pytest.raises(grpc.RpcError) as caught:
        stubs.jobs.EstimateJob(js.EstimateJobRequest(base_model=BIG, dataset_id="ds_nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_model_outside_the_catalog_still_trains_without_an_estimate(stubs: Stubs) -> None:
    dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes())
    job = stubs.jobs.CreateJob(js.CreateJobRequest(dataset_id=dataset.id, base_model="someone/unlisted-model"))
    assert not job.HasField("estimate")
