"""Enums mirroring the ``brightrun.v1`` proto enums.

Each enum is an :class:`~enum.IntEnum` whose values equal the proto numbers and
whose member names are the proto names without their prefix
(``Job.State.STATE_TRAINING`` → ``JobState.TRAINING``), so ``int(member)`` can go
straight into a request and a proto number straight into ``JobState(n)``.

They tolerate numbers a newer server may send: ``JobState(42)`` returns a
pseudo-member named ``UNKNOWN_42`` instead of raising, so an old SDK keeps
working against a new server. :meth:`ProtoEnum.parse` also accepts names in any
case (``"on_demand"``, ``"ON_DEMAND"``) for CLI flags and keyword arguments.

In pydantic models these enums validate from members, numbers or names, and
serialise to JSON as their lowercase name (``"training"``).
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Any, Self

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = [
    "CancelReason",
    "CostAlert",
    "DatasetFormat",
    "DatasetState",
    "EventType",
    "FailureClass",
    "FailureOrigin",
    "IssueOrder",
    "IssueSeverity",
    "JobState",
    "LrScheduleMode",
    "LrScheduler",
    "OomRisk",
    "Preset",
    "PricingTier",
    "PromotionReason",
    "ProtoEnum",
    "ProvisioningOutcome",
    "Quantization",
    "RecoveryChoice",
    "Role",
    "Stage",
    "StageStatus",
]


class ProtoEnum(IntEnum):
    """Base of the SDK's proto-mirroring enums; see the module docstring."""

    #: Full proto name of the mirrored enum, e.g. ``brightrun.v1.Job.State``.
    __proto_name__: str = ""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if isinstance(value, int) and not isinstance(value, bool):
            cached = cls._value2member_map_.get(value)
            if cached is not None:  # pragma: no cover - Enum checks the map first
                return cached  # type: ignore[return-value]
            member = int.__new__(cls, value)
            member._name_ = f"UNKNOWN_{value}"
            member._value_ = value
            # Cache so repeated lookups return the same object (identity, hashing).
            cls._value2member_map_[value] = member
            return member
        return None

    @property
    def is_known(self) -> bool:
        """False for a pseudo-member created for a number this SDK does not know."""
        return self._name_ in type(self).__members__

    @classmethod
    def parse(cls, value: Self | int | str) -> Self:
        """A member from a member, a proto number or a name in any case.

        Names may use ``-`` or ``_`` (``"on-demand"`` == ``"ON_DEMAND"``); the
        proto prefix is optional (``"STATE_TRAINING"``). Raises ``ValueError``
        naming the allowed values for an unknown name.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            raise ValueError(f"{cls.__name__} cannot be a bool")
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, str):
            number = _NUMBER.fullmatch(value.strip().upper())
            if number is not None:
                return cls(int(number.group(1)))
            key = value.strip().upper().replace("-", "_").replace(" ", "_")
            member = cls.__members__.get(key)
            if member is None and cls.__proto_name__:
                prefix = _prefix(cls.__proto_name__)
                member = cls.__members__.get(key.removeprefix(prefix))
            if member is not None:
                return member
            raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of {', '.join(cls.choices())}")
        raise TypeError(f"{cls.__name__} must be a {cls.__name__}, an int or a str, got {type(value).__name__}")

    @classmethod
    def choices(cls) -> list[str]:
        """Lowercase names of the members a user may pass (UNSPECIFIED excluded)."""
        return [name.lower() for name in cls.__members__ if name != "UNSPECIFIED"]

    @property
    def label(self) -> str:
        """Human-readable lowercase name: ``JobState.MODEL_LOADING.label == "model loading"``."""
        return self._name_.lower().replace("_", " ")

    def __str__(self) -> str:
        return self._name_.lower()

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: Any) -> ProtoEnum:
            try:
                return cls.parse(value)
            except TypeError as e:
                raise ValueError(str(e)) from None

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _serialize, info_arg=True, when_used="always"
            ),
            json_schema_input_schema=core_schema.union_schema([core_schema.int_schema(), core_schema.str_schema()]),
        )


#: A number, or the name of a pseudo-member: "7", "-1", "UNKNOWN_42".
_NUMBER = re.compile(r"(?:UNKNOWN_)?(-?\d+)")


def _serialize(value: ProtoEnum, info: core_schema.SerializationInfo) -> int | str | ProtoEnum:
    if info.mode == "json":
        return value._name_.lower()
    return value


def _prefix(proto_name: str) -> str:
    """Proto value prefix from the enum's proto name: ``brightrun.v1.Job.State`` → ``STATE_``."""
    short = proto_name.rsplit(".", 1)[-1]
    out = []
    for i, ch in enumerate(short):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.upper())
    return "".join(out) + "_"


class JobState(ProtoEnum):
    """Lifecycle of a job (``brightrun.v1.Job.State``)."""

    __proto_name__ = "brightrun.v1.Job.State"

    UNSPECIFIED = 0
    QUEUED = 1
    PROVISIONING = 2
    PREPROCESSING = 3
    MODEL_LOADING = 4
    TRAINING = 5
    FINALIZATION = 6
    COMPLETED = 7
    FAILED = 8
    CANCELLING = 9
    CANCELLED = 10
    PAUSING = 11
    PAUSED = 12
    RECOVERING = 13
    AWAITING_DECISION = 14

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED: the job will not change again."""
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """True while a worker is (or is about to be) running the job, and billed."""
        return self in _ACTIVE

    @property
    def needs_user(self) -> bool:
        """True for PAUSED and AWAITING_DECISION: the job waits for a user's call."""
        return self in (JobState.PAUSED, JobState.AWAITING_DECISION)


_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
_ACTIVE = frozenset(
    {
        JobState.PROVISIONING,
        JobState.PREPROCESSING,
        JobState.MODEL_LOADING,
        JobState.TRAINING,
        JobState.FINALIZATION,
        JobState.CANCELLING,
        JobState.PAUSING,
    }
)


class DatasetState(ProtoEnum):
    """Lifecycle of a dataset (``brightrun.v1.Dataset.State``)."""

    __proto_name__ = "brightrun.v1.Dataset.State"

    UNSPECIFIED = 0
    VALIDATING = 1
    READY = 2
    INVALID = 3


class DatasetFormat(ProtoEnum):
    """On-disk layout of a training file (``brightrun.v1.DatasetFormat``)."""

    __proto_name__ = "brightrun.v1.DatasetFormat"

    UNSPECIFIED = 0
    CHAT_JSONL = 1
    CONVERSATIONS = 2
    INSTRUCTION_JSONL = 3


class Preset(ProtoEnum):
    """A named set of LoRA hyperparameters (``brightrun.v1.Preset``)."""

    __proto_name__ = "brightrun.v1.Preset"

    UNSPECIFIED = 0
    CONSERVATIVE = 1
    BALANCED = 2
    AGGRESSIVE = 3


class LrScheduler(ProtoEnum):
    """Learning-rate schedule after warmup (``brightrun.v1.LrScheduler``)."""

    __proto_name__ = "brightrun.v1.LrScheduler"

    UNSPECIFIED = 0
    COSINE = 1
    LINEAR = 2
    CONSTANT = 3


class Quantization(ProtoEnum):
    """Precision of the frozen base weights (``brightrun.v1.Quantization``)."""

    __proto_name__ = "brightrun.v1.Quantization"

    UNSPECIFIED = 0
    NONE = 1
    INT8 = 2
    NF4 = 3


class PricingTier(ProtoEnum):
    """How compute is bought (``brightrun.v1.PricingTier``)."""

    __proto_name__ = "brightrun.v1.PricingTier"

    UNSPECIFIED = 0
    SPOT = 1
    ON_DEMAND = 2


class Stage(ProtoEnum):
    """One phase of a job attempt, in run order (``brightrun.v1.Stage``)."""

    __proto_name__ = "brightrun.v1.Stage"

    UNSPECIFIED = 0
    PROVISIONING = 1
    PREPROCESSING = 2
    MODEL_LOADING = 3
    TRAINING = 4
    FINALIZATION = 5


class StageStatus(ProtoEnum):
    """Where a stage is in its own lifecycle (``brightrun.v1.JobStage.Status``)."""

    __proto_name__ = "brightrun.v1.JobStage.Status"

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4


class CancelReason(ProtoEnum):
    """Why a user cancelled a job (``brightrun.v1.CancelReason``)."""

    __proto_name__ = "brightrun.v1.CancelReason"

    UNSPECIFIED = 0
    LOSS_NOT_DECREASING = 1
    COST_TOO_HIGH = 2
    WRONG_CONFIGURATION = 3
    TESTING = 4
    BETTER_RESULTS_ELSEWHERE = 5
    CLIENT_REQUEST = 6
    OTHER = 7


class FailureClass(ProtoEnum):
    """Why an attempt or job failed; decides the recovery policy (``brightrun.v1.FailureClass``)."""

    __proto_name__ = "brightrun.v1.FailureClass"

    UNSPECIFIED = 0
    OUT_OF_MEMORY = 1
    DATASET_FORMAT = 2
    PROVISIONING = 3
    SPOT_INTERRUPTION = 4
    WORKER_LOST = 5
    TRANSIENT = 6
    MODEL_UNAVAILABLE = 7
    FILE_IO = 8
    DISK_FULL = 9
    TRAINING_TIMEOUT = 10
    LOSS_DIVERGENCE = 11
    STALL = 12
    USER_CANCEL = 13
    INTERNAL = 14


class EventType(ProtoEnum):
    """Type of a job event (``brightrun.v1.JobEvent.Type``)."""

    __proto_name__ = "brightrun.v1.JobEvent.Type"

    UNSPECIFIED = 0
    STATUS = 1
    METRICS = 2
    WARNING = 3
    ERROR = 4
    INFO = 5
    CHECKPOINT = 6


class IssueSeverity(ProtoEnum):
    """Whether a dataset problem blocks training (``brightrun.v1.ValidationIssue.Severity``)."""

    __proto_name__ = "brightrun.v1.ValidationIssue.Severity"

    UNSPECIFIED = 0
    CRITICAL = 1
    WARNING = 2


class IssueOrder(ProtoEnum):
    """How to sort dataset problems (``brightrun.v1.IssueOrder``)."""

    __proto_name__ = "brightrun.v1.IssueOrder"

    UNSPECIFIED = 0
    INDEX = 1
    TYPE = 2
    SEVERITY = 3


class RecoveryChoice(ProtoEnum):
    """What to do when automatic recovery has given up (``brightrun.v1.RecoveryChoice``)."""

    __proto_name__ = "brightrun.v1.RecoveryChoice"

    UNSPECIFIED = 0
    KEEP_TRYING = 1
    SWITCH_TO_ON_DEMAND = 2
    CANCEL = 3
    EXTEND = 4


class ProvisioningOutcome(ProtoEnum):
    """How a provisioning try ended (``brightrun.v1.ProvisioningOutcome``)."""

    __proto_name__ = "brightrun.v1.ProvisioningOutcome"

    UNSPECIFIED = 0
    PROVISIONED = 1
    SPOT_UNAVAILABLE = 2
    TIMEOUT = 3
    DATACENTER_UNAVAILABLE = 4
    QUOTA_EXCEEDED = 5
    RATE_LIMITED = 6


class CostAlert(ProtoEnum):
    """Budget status against the estimate (``brightrun.v1.CostAlert``)."""

    __proto_name__ = "brightrun.v1.CostAlert"

    UNSPECIFIED = 0
    WARNING = 1
    OVER_ESTIMATE = 2


class FailureOrigin(ProtoEnum):
    """Whose action can fix a failure (``brightrun.v1.FailureOrigin``)."""

    __proto_name__ = "brightrun.v1.FailureOrigin"

    UNSPECIFIED = 0
    USER = 1
    SYSTEM = 2


class LrScheduleMode(ProtoEnum):
    """How a continuation treats the learning-rate schedule (``brightrun.v1.LrScheduleMode``)."""

    __proto_name__ = "brightrun.v1.LrScheduleMode"

    UNSPECIFIED = 0
    CONTINUE = 1
    RESTART_WARMUP = 2


class PromotionReason(ProtoEnum):
    """Why a job jumps the queue (``brightrun.v1.PromotionReason``)."""

    __proto_name__ = "brightrun.v1.PromotionReason"

    UNSPECIFIED = 0
    CLIENT_DEADLINE = 1
    CRITICAL_BUSINESS_NEED = 2
    URGENT_FIX = 3
    MANAGER_OVERRIDE = 4


class OomRisk(ProtoEnum):
    """Estimated memory against the GPU's capacity (``brightrun.v1.OomRisk``)."""

    __proto_name__ = "brightrun.v1.OomRisk"

    UNSPECIFIED = 0
    LOW = 1
    MODERATE = 2
    HIGH = 3


class Role(ProtoEnum):
    """What an API key may do in its project (``brightrun.v1.Role``). Each role
    includes the ones before it, so roles compare by rank:
    ``Role.ADMIN > Role.MEMBER > Role.VIEWER``."""

    __proto_name__ = "brightrun.v1.Role"

    UNSPECIFIED = 0
    #: Reads: get, list, stream, watch, estimate, export, usage.
    VIEWER = 1
    #: Viewer, plus datasets and jobs: upload, create, cancel, pause, resume, retry, decide.
    MEMBER = 2
    #: Member, plus queue promotion and API key management.
    ADMIN = 3


#: Every SDK enum by the full name of the proto enum it mirrors.
BY_PROTO_NAME: dict[str, type[ProtoEnum]] = {
    cls.__proto_name__: cls
    for cls in (
        JobState,
        DatasetState,
        DatasetFormat,
        Preset,
        LrScheduler,
        Quantization,
        PricingTier,
        Stage,
        StageStatus,
        CancelReason,
        FailureClass,
        EventType,
        OomRisk,
        RecoveryChoice,
        FailureOrigin,
        LrScheduleMode,
        IssueSeverity,
        IssueOrder,
        ProvisioningOutcome,
        CostAlert,
        PromotionReason,
        Role,
    )
}
