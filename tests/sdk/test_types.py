"""Property tests of every proto ↔ pydantic mapping, and of the enums.

Messages are generated from the proto descriptors (so a new proto field is
covered the day it appears), including enum numbers this SDK does not know.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import cache
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import brightrun
from brightrun.enums import BY_PROTO_NAME, JobState, ProtoEnum
from brightrun.types import MODELS, JobBase, ProtoModel, TrainingConfig
from brightrun.v1 import (
    api_key_service_pb2,
    dataset_pb2,
    job_pb2,
    job_service_pb2,
    project_service_pb2,
    queue_service_pb2,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
DOUBLE = st.floats(allow_nan=False)
# Timestamps at microsecond precision over the whole valid range (years 1-9999).
MIN_TS, MAX_TS = -62135596800, 253402300799
TIMESTAMP = st.tuples(st.integers(MIN_TS, MAX_TS), st.integers(0, 999_999))
DURATION = st.tuples(st.integers(0, 10**10), st.integers(0, 999_999), st.booleans())
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
STRUCT = st.dictionaries(TEXT, JSON_VALUE, max_size=4)
#: Known numbers and numbers no SDK version knows yet.
ENUM_NUMBER = st.integers(0, 40)

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_DOUBLE: DOUBLE,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: TEXT,
}


def _nullable(model: type[ProtoModel[Any]], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    return get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)


def _model_of(descriptor: Descriptor) -> type[ProtoModel[Any]]:
    return MODELS[descriptor.full_name]


@cache
def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` in the shapes the server sends: every
    sub-message the model treats as always present is set."""
    model = _model_of(descriptor)
    field_strategies: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        value = _value_strategy(fd)
        is_message = fd.type == FieldDescriptor.TYPE_MESSAGE
        if not fd.is_repeated and (_nullable(model, fd.name) if is_message else fd.has_presence):
            value = st.none() | value
        field_strategies[fd.name] = value

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = _message_class(descriptor)()
        for fd in descriptor.fields:
            _assign(message, fd, draw(field_strategies[fd.name]))
        return message

    return build()


def _message_class(descriptor: Descriptor) -> type[Message]:
    return MODELS[descriptor.full_name]._proto_type


def _value_strategy(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        full = fd.message_type.full_name
        if fd.message_type.GetOptions().map_entry:
            value_type = fd.message_type.fields_by_name["value"].type
            return st.dictionaries(TEXT, _SCALARS[value_type], max_size=3)
        well_known: dict[str, st.SearchStrategy[Any]] = {
            "google.protobuf.Timestamp": TIMESTAMP,
            "google.protobuf.Duration": DURATION,
            "google.protobuf.Struct": STRUCT,
        }
        element: st.SearchStrategy[Any] = (
            well_known[full] if full in well_known else st.deferred(lambda: messages(fd.message_type))
        )
    elif fd.type == FieldDescriptor.TYPE_ENUM:
        element = ENUM_NUMBER
    else:
        element = _SCALARS[fd.type]
    return st.lists(element, max_size=3) if fd.is_repeated else element


def _assign(message: Any, fd: FieldDescriptor, value: Any) -> None:
    if value is None:
        return
    name = fd.name
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        full = fd.message_type.full_name
        if fd.message_type.GetOptions().map_entry:
            getattr(message, name).update(value)
        elif fd.is_repeated:
            getattr(message, name).extend(value)
        elif full == "google.protobuf.Timestamp":
            seconds, micros = value
            getattr(message, name).seconds = seconds
            getattr(message, name).nanos = micros * 1000
        elif full == "google.protobuf.Duration":
            seconds, micros, negative = value
            sign = -1 if negative and (seconds or micros) else 1
            getattr(message, name).seconds = sign * seconds
            getattr(message, name).nanos = sign * micros * 1000
        elif full == "google.protobuf.Struct":
            getattr(message, name).SetInParent()
            getattr(message, name).update(value)
        else:
            getattr(message, name).CopyFrom(value)
    elif fd.is_repeated:
        getattr(message, name).extend(value)
    else:
        setattr(message, name, value)


def _check_values(model: ProtoModel[Any], message: Any) -> None:
    """Field by field, independently of the SDK's converter: the model holds
    what the proto holds, in the documented Python types."""
    for fd in message.DESCRIPTOR.fields:
        value = getattr(model, fd.name)
        raw = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            assert value == dict(raw)
        elif fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE:
            assert len(value) == len(raw)
            for item, raw_item in zip(value, raw, strict=True):
                _check_values(item, raw_item)
        elif fd.is_repeated:
            assert list(value) == list(raw)
        elif (
            fd.type == FieldDescriptor.TYPE_MESSAGE
            and not message.HasField(fd.name)
            and _nullable(type(model), fd.name)
        ):
            assert value is None, fd.name
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            full = fd.message_type.full_name
            if full == "google.protobuf.Timestamp":
                assert value == raw.ToDatetime(tzinfo=UTC)
                assert value.tzinfo is not None
            elif full == "google.protobuf.Duration":
                assert isinstance(value, timedelta)
                assert value == raw.ToTimedelta()
            elif full == "google.protobuf.Struct":
                assert value == json_format.MessageToDict(raw)
            else:
                _check_values(value, raw)
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            assert isinstance(value, ProtoEnum)
            assert int(value) == raw
            assert type(value) is BY_PROTO_NAME[fd.enum_type.full_name]
        elif fd.has_presence and not message.HasField(fd.name):
            assert value is None, fd.name
        else:
            assert value == raw, fd.name


@pytest.mark.parametrize("full_name", sorted(MODELS))
def test_proto_model_round_trip(full_name: str) -> None:
    model_cls = MODELS[full_name]

    @PROPERTY
    @given(messages(model_cls._proto_type.DESCRIPTOR))
    def check(message: Message) -> None:
        model = model_cls.from_proto(message)
        assert model.raw is message
        assert model.to_proto() == message
        again = model_cls.from_proto(model.to_proto())
        assert again == model
        assert hash(again) == hash(model)
        _check_values(model, message)

    check()


def _messages_of(file: Any) -> list[Descriptor]:
    out: list[Descriptor] = []

    def walk(descriptor: Descriptor) -> None:
        out.append(descriptor)
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested)

    for descriptor in file.message_types_by_name.values():
        walk(descriptor)
    return out


@pytest.mark.parametrize("file", [job_pb2.DESCRIPTOR, dataset_pb2.DESCRIPTOR], ids=lambda f: f.name)
def test_every_resource_message_has_a_model_with_every_field(file: Any) -> None:
    for descriptor in _messages_of(file):
        assert descriptor.full_name in MODELS, f"no SDK model for {descriptor.full_name}"
        model = MODELS[descriptor.full_name]
        assert set(model.model_fields) == {fd.name for fd in descriptor.fields}, descriptor.full_name


def _enums_of(file: Any) -> list[EnumDescriptor]:
    out = list(file.enum_types_by_name.values())
    for descriptor in _messages_of(file):
        out += list(descriptor.enum_types)
    return out


#: Responses the SDK returns as a model (others become plain values or lists).
MODELLED_RESPONSES = {
    "brightrun.v1.PromoteJobResponse",
    "brightrun.v1.CreateApiKeyResponse",
    "brightrun.v1.GetCallerResponse",
}
SERVICE_FILES = [
    job_service_pb2.DESCRIPTOR,
    queue_service_pb2.DESCRIPTOR,
    project_service_pb2.DESCRIPTOR,
    api_key_service_pb2.DESCRIPTOR,
]


@pytest.mark.parametrize("file", SERVICE_FILES, ids=lambda f: f.name)
def test_every_result_message_of_the_services_has_a_model(file: Any) -> None:
    """Messages that services return inside their responses (FailureReport,
    RecoveryFix, Queue, Usage, ...) have models with every field, so a new
    field or message is covered (and round-tripped above) the day it appears."""
    for descriptor in _messages_of(file):
        name = descriptor.full_name
        if name.endswith(("Request", "Response")) and name not in MODELLED_RESPONSES:
            continue
        assert name in MODELS, f"no SDK model for {name}"
        assert set(MODELS[name].model_fields) == {fd.name for fd in descriptor.fields}, name


def test_fix_suggestions_is_a_tuple_of_fixes_with_the_failure_class() -> None:
    message = job_service_pb2.SuggestFixesResponse(failure_class=job_pb2.FAILURE_CLASS_DATASET_FORMAT)
    message.fixes.add(id="fix_dataset", title="Fix the dataset")
    message.fixes.add(id="retry_same_config", applicable=True)
    message.fixes.add(id="reduce_batch_size", applicable=True).config_changes.batch_size = 4
    message.fixes.add(id="new_kind_of_change", applicable=False).config_changes.lora_rank = 8
    fixes = brightrun.FixSuggestions.from_proto(message)
    assert isinstance(fixes, tuple)
    assert fixes.failure_class is brightrun.FailureClass.DATASET_FORMAT
    # The server's flag decides, not what the fix changes.
    assert [f.id for f in fixes.applicable] == ["retry_same_config", "reduce_batch_size"]
    assert fixes.top is fixes[1]
    assert fixes.get("reduce_batch_size") == fixes[2]
    assert fixes[2].changes() == {"batch_size": 4}
    assert "fix_dataset" in repr(fixes)
    assert brightrun.FixSuggestions().top is None


def test_fix_confidence_and_changes_read_well() -> None:
    assert str(brightrun.FixConfidence()) == "experimental (no outcomes yet)"
    assert str(brightrun.FixConfidence(success_rate=0.5, outcomes=4, experimental=True)) == "experimental, 50% of 4"
    assert str(brightrun.FixConfidence(success_rate=0.9, outcomes=40)) == "90% of 40"
    fix = brightrun.RecoveryFix(
        id="switch_to_on_demand",
        compute_changes=brightrun.ComputeConfig(pricing_tier="on_demand", max_duration=timedelta(hours=2)),
        base_model="Qwen/Qwen2.5-0.5B",
        applicable=True,
    )
    assert fix.changes() == {
        "base_model": "Qwen/Qwen2.5-0.5B",
        "compute.pricing_tier": brightrun.PricingTier.ON_DEMAND,
        "compute.max_duration": timedelta(hours=2),
    }
    assert fix.applicable
    assert not brightrun.RecoveryFix(id="check_model").applicable


@pytest.mark.parametrize("file", [job_pb2.DESCRIPTOR, dataset_pb2.DESCRIPTOR, *SERVICE_FILES], ids=lambda f: f.name)
def test_every_resource_enum_is_mirrored(file: Any) -> None:
    """Values equal the proto numbers; names drop the prefix."""
    for proto_enum in _enums_of(file):
        sdk_enum = BY_PROTO_NAME.get(proto_enum.full_name)
        assert sdk_enum is not None, f"no SDK enum for {proto_enum.full_name}"
        proto_values = {v.name: v.number for v in proto_enum.values}
        prefix = proto_enum.values[0].name.removesuffix("UNSPECIFIED")
        assert {prefix + m.name: m.value for m in sdk_enum} == proto_values


@pytest.mark.parametrize("enum_cls", sorted(set(BY_PROTO_NAME.values()), key=lambda c: c.__name__))
@PROPERTY
@given(number=st.integers(-(2**31), 2**31 - 1))
def test_enums_tolerate_unknown_numbers(enum_cls: type[ProtoEnum], number: int) -> None:
    member = enum_cls(number)
    assert int(member) == number
    assert member is enum_cls(number)
    assert member.is_known == (number in {m.value for m in enum_cls})
    assert enum_cls.parse(str(member)) is member
    if not member.is_known:
        assert str(member) == f"unknown_{number}"


def test_enum_parse_accepts_names_in_any_form() -> None:
    assert brightrun.PricingTier.parse("on-demand") is brightrun.PricingTier.ON_DEMAND
    assert brightrun.PricingTier.parse("ON_DEMAND") is brightrun.PricingTier.ON_DEMAND
    assert brightrun.Preset.parse("PRESET_AGGRESSIVE") is brightrun.Preset.AGGRESSIVE
    assert brightrun.JobState.parse(5) is brightrun.JobState.TRAINING
    with pytest.raises(ValueError, match="expected one of conservative, balanced, aggressive"):
        brightrun.Preset.parse("wild")


def test_job_state_terminal_set() -> None:
    terminal = {s for s in JobState if s.is_terminal}
    assert terminal == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}
    assert not JobState(99).is_terminal


def test_unknown_enum_from_a_newer_server_does_not_break_a_job() -> None:
    message = job_pb2.Job(id="job_1", state=42, preset=9)  # type: ignore[arg-type]
    job = brightrun.Job.from_proto(message)
    assert job.state.name == "UNKNOWN_42"
    assert not job.is_terminal
    assert json.loads(job.model_dump_json())["state"] == "unknown_42"


def test_json_round_trip_with_names() -> None:
    message = job_pb2.Job(id="job_1", state=job_pb2.Job.STATE_TRAINING, labels={"team": "nlp"})
    message.config.lora_rank = 8
    message.config.quantization = job_pb2.QUANTIZATION_NF4
    message.compute.max_duration.FromTimedelta(timedelta(hours=2))
    message.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))
    job = JobBase.from_proto(message)
    data = json.loads(job.model_dump_json())
    assert data["state"] == "training"
    assert data["config"]["quantization"] == "nf4"
    assert data["compute"]["max_duration"] == 7200.0
    assert data["create_time"].startswith("2026-01-02T03:04:05.678")
    assert JobBase.model_validate_json(job.model_dump_json()) == job


def test_models_are_frozen_and_equal_by_value() -> None:
    built = TrainingConfig(lora_rank=8, quantization="nf4", target_modules=["q_proj"])
    assert built.raw == TrainingConfig.from_proto(built.raw).raw
    assert built == TrainingConfig.from_proto(built.to_proto())
    assert built.overrides() == {
        "lora_rank": 8,
        "quantization": brightrun.Quantization.NF4,
        "target_modules": ("q_proj",),
    }
    with pytest.raises(ValueError, match="frozen"):
        built.lora_rank = 9  # type: ignore[misc]


def test_unbound_job_handle_explains_itself() -> None:
    job = brightrun.Job.from_proto(job_pb2.Job(id="job_1"))
    with pytest.raises(RuntimeError, match="not bound to a client"):
        job.reload()


_FRESH_IMPORT = """
import json, sys
from types import UnionType
from typing import Union, get_args, get_origin
from brightrun.types import MODELS
bad = []
# JobCost first: it refers to ValueRange, and converting it before anything
# else once turned its unset estimate into an empty range.
order = ["brightrun.v1.JobCost", *sorted(MODELS, reverse=True)]
for name in order:
    cls = MODELS[name]
    model = cls.from_proto(cls._proto_type())
    cls.model_rebuild(force=True)  # read the annotations resolved, whatever the SDK did
    for field, info in cls.model_fields.items():
        optional = get_origin(info.annotation) in (Union, UnionType) and type(None) in get_args(info.annotation)
        if optional and getattr(model, field) is not None:
            bad.append(f"{name}.{field}")
print(json.dumps(bad))
"""


def test_unset_fields_are_none_right_after_import() -> None:
    """In a fresh interpreter, converting before anything else still maps unset
    optional fields to None (forward references are resolved at import)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
