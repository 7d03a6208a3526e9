"""Dataset validation through the API: stats, every problem listed with its
place and context, CSV export, tokenizer-aware re-validation."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import grpc
import pytest

from brightrun.v1 import dataset_pb2, job_pb2
from brightrun.v1 import dataset_service_pb2 as ds
from brightrun.v1 import job_service_pb2 as js
from tests.conftest import EXAMPLES
from tests.server.conftest import Stubs, details

GOOD = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
BROKEN = (
    GOOD * 3
    + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'  # no final assistant turn
    + b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}\n'  # malformed JSON
    + b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'  # unknown role
    + b'{"messages": []}\n'  # empty array
)


@pytest.fixture
def broken(stubs: Stubs) -> dataset_pb2.Dataset:
    dataset: dataset_pb2.Dataset = stubs.upload(BROKEN, filename="broken.jsonl")
    return dataset


def test_upload_reports_counts_band_and_readiness(broken: dataset_pb2.Dataset) -> None:
    v = broken.validation
    assert broken.state == dataset_pb2.Dataset.STATE_INVALID
    assert v.critical_count == sum(v.counts_by_type.values()) - v.warning_count
    assert v.quality_score == max(0, 100 - 10 * v.critical_count - 2 * v.warning_count)
    assert v.quality_band == "fix_first"
    assert not v.ready
    assert {c.name for c in v.readiness} >= {"format_compatible", "sufficient_volume", "quality_score"}
    assert len(v.first_errors) == 3
    assert all(e.startswith("Conversation #") or "line" in e.lower() for e in v.first_errors)


def test_errors_page_sort_filter_and_carry_context(stubs: Stubs, broken: dataset_pb2.Dataset) -> None:
    seen = []
    token = ""
    while True:
        page = stubs.datasets.ListValidationErrors(
            ds.ListValidationErrorsRequest(dataset_id=broken.id, page_size=2, page_token=token)
        )
        seen += list(page.issues)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == page.total_size == sum(broken.validation.counts_by_type.values())
    assert [i.line for i in seen] == sorted(i.line for i in seen), "index order by default"
    types = {i.type for i in seen}
    assert {"malformed_json", "unknown_role", "empty_array"} <= types
    malformed = next(i for i in seen if i.type == "malformed_json")
    assert (malformed.line, malformed.severity) == (5, dataset_pb2.ValidationIssue.SEVERITY_CRITICAL)
    assert malformed.HasField("byte_offset")
    assert malformed.suggested_fix
    by_severity = stubs.datasets.ListValidationErrors(
        ds.ListValidationErrorsRequest(dataset_id=broken.id, order_by=ds.ISSUE_ORDER_SEVERITY, page_size=100)
    ).issues
    severities = [i.severity for i in by_severity]
    assert severities == sorted(severities)
    critical = stubs.datasets.ListValidationErrors(
        ds.ListValidationErrorsRequest(dataset_id=broken.id, critical_only=True, include_context=True, page_size=100)
    ).issues
    assert critical
    assert all(i.severity == dataset_pb2.ValidationIssue.SEVERITY_CRITICAL for i in critical)
    with_line = next(i for i in critical if i.type == "malformed_json")
    marked = [line for line in with_line.context.lines if line.marked]
    assert [line.number for line in marked] == [5]
    assert with_line.context.lines[0].number == 1
    roles = stubs.datasets.ListValidationErrors(
        ds.ListValidationErrorsRequest(dataset_id=broken.id, types=["unknown_role"])
    )
    assert [i.type for i in roles.issues] == ["unknown_role"]
    assert roles.issues[0].field_path.endswith(".role")


def test_errors_export_as_csv(stubs: Stubs, broken: dataset_pb2.Dataset) -> None:
    chunks = stubs.datasets.ExportValidationErrors(ds.ExportValidationErrorsRequest(dataset_id=broken.id))
    text = b"".join(c.chunk for c in chunks).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == sum(broken.validation.counts_by_type.values())
    assert {"type", "severity", "path", "line", "message", "suggested_fix"} <= set(rows[0])
    assert any(r["type"] == "malformed_json" and r["line"] == "5" for r in rows)


def test_conversations_format_stats(stubs: Stubs) -> None:
    data = (EXAMPLES / "support_conversations.json").read_bytes()
    dataset = stubs.upload(data, filename="support_conversations.json")
    assert dataset.format == dataset_pb2.DATASET_FORMAT_CONVERSATIONS
    assert dataset.stats.training_pairs > dataset.stats.conversations > 0
    assert dataset.stats.personas
    assert sum(dataset.stats.topics.values()) == dataset.stats.training_pairs
    assert sum(b.count for b in dataset.stats.length_histogram) == dataset.stats.training_pairs
    assert dataset.stats.length_unit == "chars"


def test_tokenizer_aware_revalidation_feeds_real_token_counts(stubs: Stubs, tiny_model: Path) -> None:
    dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes(), filename="chat.jsonl")
    checked = stubs.datasets.ValidateDataset(
        ds.ValidateDatasetRequest(dataset_id=dataset.id, base_model=str(tiny_model), max_seq_length=512)
    )
    assert checked.stats.length_unit == "tokens"
    assert checked.stats.total_tokens > checked.stats.training_pairs
    assert 0 < checked.stats.max_tokens <= 512
    assert checked.validation.base_model == str(tiny_model)
    tokenization = next(c for c in checked.validation.readiness if c.name == "tokenization")
    assert tokenization.passed
    estimate = stubs.jobs.EstimateJob(
        js.EstimateJobRequest(dataset_id=dataset.id, base_model=str(tiny_model), overrides=job_pb2.TrainingConfig())
    ).estimate
    assert estimate.token_source.startswith("tokenizer")
    assert estimate.duration.train_tokens.low > 0


def test_tight_max_length_makes_token_problems_and_bad_models_are_named(stubs: Stubs, tiny_model: Path) -> None:
    dataset = stubs.upload((EXAMPLES / "support_chat.jsonl").read_bytes(), filename="chat.jsonl")
    shorter = stubs.datasets.ValidateDataset(
        ds.ValidateDatasetRequest(dataset_id=dataset.id, base_model=str(tiny_model), max_seq_length=170)
    )
    assert shorter.validation.counts_by_type["token_length_exceeded"] > 0
    assert shorter.state == dataset_pb2.Dataset.STATE_READY, "truncation alone is a warning"
    tight = stubs.datasets.ValidateDataset(
        ds.ValidateDatasetRequest(dataset_id=dataset.id, base_model=str(tiny_model), max_seq_length=64)
    )
    assert tight.validation.counts_by_type["all_labels_masked"] == tight.stats.training_pairs
    assert tight.state == dataset_pb2.Dataset.STATE_INVALID, "every answer truncated away is critical"
    with pytest.raises(grpc.RpcError) as caught:
        stubs.datasets.ValidateDataset(ds.ValidateDatasetRequest(dataset_id=dataset.id, base_model="/no/such/model"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1][0][0] == "base_model"
    assert stubs.datasets.GetDataset(ds.GetDatasetRequest(dataset_id=dataset.id)).validation == tight.validation
