"""Recovery decisions: policy, backoff, recover / escalate / fail, and what a
continuation may change. Pure: no store, no clock of its own.

A failure's class (domain/failures.py) says whether a blind retry can help. User
errors (out of memory, dataset format, unavailable model, divergence) are never
retried automatically: the user retries them with RetryJob, which has its own
budget (MAX_RETRIES per original job). System failures (spot interruption, lost
worker, transient errors, stalls, file I/O) are recovered automatically from the
newest verified checkpoint, up to ``max_system_retries`` in a row; an attempt
that makes training progress resets the count. Backoff between automatic
attempts is exponential with full jitter: delay = uniform(base/2, base) where
base = min(max_backoff, initial_backoff * 2**(n-1)) for the n-th retry in a row.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from brightrun_server.domain.errors import FieldViolation, InvalidArgument
from brightrun_server.domain.failures import ClassPolicy

#: Retries (RetryJob) that may descend from one original job.
MAX_RETRIES = 5


class Choice(StrEnum):
    """What happens when automatic recovery gives up (RecoveryChoice)."""

    WAIT = ""
    KEEP_TRYING = "keep_trying"
    SWITCH_TO_ON_DEMAND = "switch_to_on_demand"
    CANCEL = "cancel"
    EXTEND = "extend"


DECISION_CHOICES = (Choice.KEEP_TRYING, Choice.SWITCH_TO_ON_DEMAND, Choice.CANCEL)


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    max_system_retries: int = 3
    initial_backoff_seconds: float = 2.0
    max_backoff_seconds: float = 300.0
    on_exhausted: Choice = Choice.WAIT

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["on_exhausted"] = self.on_exhausted.value
        return body

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> RecoveryPolicy:
        return cls(
            max_system_retries=int(body.get("max_system_retries", 3)),
            initial_backoff_seconds=float(body.get("initial_backoff_seconds", 2.0)),
            max_backoff_seconds=float(body.get("max_backoff_seconds", 300.0)),
            on_exhausted=Choice(body.get("on_exhausted", "")),
        )


def resolve_policy(
    defaults: RecoveryPolicy,
    *,
    max_system_retries: int | None = None,
    initial_backoff_seconds: float | None = None,
    max_backoff_seconds: float | None = None,
    on_exhausted: Choice | None = None,
) -> RecoveryPolicy:
    """Overrides on top of the server's defaults; InvalidArgument names each bad field."""
    violations: list[FieldViolation] = []
    retries = defaults.max_system_retries if max_system_retries is None else max_system_retries
    initial = defaults.initial_backoff_seconds if initial_backoff_seconds is None else initial_backoff_seconds
    maximum = defaults.max_backoff_seconds if max_backoff_seconds is None else max_backoff_seconds
    if not 0 <= retries <= 10:
        violations.append(
            FieldViolation("recovery_policy.max_system_retries", f"must be between 0 and 10, got {retries}")
        )
    if not 0.1 <= initial <= 3600:
        violations.append(
            FieldViolation("recovery_policy.initial_backoff", f"must be between 0.1 s and 1 h, got {initial:g} s")
        )
    if not 0.1 <= maximum <= 86_400 or maximum < initial:
        violations.append(
            FieldViolation(
                "recovery_policy.max_backoff", f"must be between the initial backoff and 24 h, got {maximum:g} s"
            )
        )
    if violations:
        raise InvalidArgument(violations)
    return RecoveryPolicy(retries, initial, maximum, defaults.on_exhausted if on_exhausted is None else on_exhausted)


class Action(StrEnum):
    RECOVER = "recover"
    ESCALATE = "escalate"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: When the next attempt may start (RECOVER).
    next_attempt_time: datetime | None = None
    #: What escalation does (ESCALATE).
    escalation: Choice = Choice.WAIT


def backoff_seconds(policy: RecoveryPolicy, retry_number: int, rng: random.Random | None = None) -> float:
    """Delay before the `retry_number`-th automatic retry in a row (1-based)."""
    base = min(policy.max_backoff_seconds, policy.initial_backoff_seconds * 2 ** max(0, retry_number - 1))
    return (rng or random).uniform(base / 2, base)


def decide(
    policy: RecoveryPolicy,
    class_policy: ClassPolicy,
    consecutive_failures: int,
    now: datetime,
    rng: random.Random | None = None,
) -> Decision:
    """What to do after an attempt failed. `consecutive_failures` counts system
    failures in a row before this one."""
    if not (class_policy.retryable and class_policy.origin == "system"):
        return Decision(Action.FAIL)
    if consecutive_failures < policy.max_system_retries:
        delay = backoff_seconds(policy, consecutive_failures + 1, rng)
        return Decision(Action.RECOVER, next_attempt_time=now + timedelta(seconds=delay))
    return Decision(Action.ESCALATE, escalation=policy.on_exhausted)


#: Fields a continuation (ResumeFromCheckpoint) may change.
CHANGEABLE_ON_RESUME = frozenset(
    {
        "batch_size",
        "gradient_accumulation_steps",
        "epochs",
        "learning_rate",
        "warmup_ratio",
        "max_steps",
        "checkpoint_interval_steps",
        "eval_interval_steps",
        "gradient_checkpointing",
    }
)
#: Fields that define the adapter's shape: a checkpoint cannot be loaded otherwise.
LOCKED_ON_RESUME = frozenset({"lora_rank", "lora_alpha", "target_modules"})


def check_resume_changes(
    original: Mapping[str, Any], changes: Mapping[str, Any], field_prefix: str = "changes"
) -> None:
    """Refuse changes a continuation cannot make, naming each field."""
    violations: list[FieldViolation] = []
    for name, value in changes.items():
        path = f"{field_prefix}.{name}"
        if name in LOCKED_ON_RESUME:
            if _normalise(value) != _normalise(original.get(name)):
                violations.append(
                    FieldViolation(
                        path, f"is locked on resume: the checkpoint's adapter has {name}={original.get(name)}"
                    )
                )
        elif name not in CHANGEABLE_ON_RESUME:
            allowed = ", ".join(sorted(CHANGEABLE_ON_RESUME))
            violations.append(FieldViolation(path, f"cannot change on resume; changeable fields: {allowed}"))
        elif name == "epochs" and int(value) > int(original["epochs"]):
            violations.append(FieldViolation(path, f"must not exceed the original {original['epochs']} epochs"))
    if violations:
        raise InvalidArgument(violations)


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value
