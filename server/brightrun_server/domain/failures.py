"""Failure classification: a failure document in, a class and its policy out.

Rules are data (failure_rules.json): ordered pattern -> class, first match wins,
so a new kind of failure needs a rule, not code. Each class carries its origin
(user | system), whether a blind retry may help, and the recovery to offer.
"""

from __future__ import annotations

import json
import re
import signal as signals
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any


class FailureClass(StrEnum):
    OUT_OF_MEMORY = "out_of_memory"
    DATASET_FORMAT = "dataset_format"
    PROVISIONING = "provisioning"
    SPOT_INTERRUPTION = "spot_interruption"
    WORKER_LOST = "worker_lost"
    TRANSIENT = "transient"
    MODEL_UNAVAILABLE = "model_unavailable"
    FILE_IO = "file_io"
    DISK_FULL = "disk_full"
    TRAINING_TIMEOUT = "training_timeout"
    LOSS_DIVERGENCE = "loss_divergence"
    STALL = "stall"
    USER_CANCEL = "user_cancel"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class ClassPolicy:
    origin: str
    retryable: bool
    recovery: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    failure_class: FailureClass
    exception_types: frozenset[str] = frozenset()
    message: re.Pattern[str] | None = None
    stages: frozenset[str] = frozenset()

    def matches(self, exception_type: str, message: str, stage: str) -> bool:
        if self.exception_types:
            short = exception_type.rsplit(".", 1)[-1]
            if exception_type not in self.exception_types and short not in self.exception_types:
                return False
        if self.message is not None and not self.message.search(message):
            return False
        return not self.stages or stage in self.stages


@dataclass(frozen=True, slots=True)
class Classification:
    failure_class: FailureClass
    policy: ClassPolicy
    #: What the decision rests on, for the failure report.
    evidence: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Rulebook:
    rules: tuple[Rule, ...]
    policies: dict[FailureClass, ClassPolicy]

    def policy(self, failure_class: FailureClass) -> ClassPolicy:
        return self.policies[failure_class]

    def classify(
        self,
        *,
        exception_type: str = "",
        message: str = "",
        stage: str = "",
        exit_code: int | None = None,
        signal: int | None = None,
        stopped_unrequested: bool = False,
    ) -> Classification:
        """Classify one ended attempt.

        `stopped_unrequested`: the trainer checkpointed and stopped on a SIGTERM
        the server did not send (a preemption notice).
        """
        if exception_type or message:
            for rule in self.rules:
                if rule.matches(exception_type, message, stage):
                    cls = rule.failure_class
                    evidence = [
                        f"{exception_type or 'error'}: {message[:200]}",
                        f"matched rule for {cls}",
                    ]
                    return Classification(cls, self.policies[cls], evidence)
            return Classification(
                FailureClass.INTERNAL,
                self.policies[FailureClass.INTERNAL],
                [f"{exception_type or 'error'}: {message[:200]}", "no rule matched"],
            )
        if stopped_unrequested:
            cls = FailureClass.SPOT_INTERRUPTION
            return Classification(
                cls,
                self.policies[cls],
                ["trainer stopped on a termination signal the server did not send"],
            )
        if signal is not None:
            name = _signal_name(signal)
            cls = FailureClass.WORKER_LOST
            return Classification(cls, self.policies[cls], [f"trainer process ended by {name} without a report"])
        cls = FailureClass.INTERNAL if exit_code not in (None, 0) else FailureClass.WORKER_LOST
        return Classification(
            cls,
            self.policies[cls],
            [f"trainer process exited with code {exit_code} without a report"],
        )


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def load_rulebook(path: Path | None = None) -> Rulebook:
    raw: dict[str, Any] = json.loads((path or Path(__file__).with_name("failure_rules.json")).read_text())
    rules = tuple(
        Rule(
            failure_class=FailureClass(r["class"]),
            exception_types=frozenset(r.get("exception_types", ())),
            message=re.compile(r["message"], re.IGNORECASE) if "message" in r else None,
            stages=frozenset(r.get("stages", ())),
        )
        for r in raw["rules"]
    )
    policies = {FailureClass(k): ClassPolicy(**v) for k, v in raw["classes"].items()}
    missing = set(FailureClass) - set(policies)
    if missing:
        raise ValueError(f"failure_rules.json lacks policies for {sorted(missing)}")
    return Rulebook(rules, policies)


@cache
def default_rulebook() -> Rulebook:
    return load_rulebook()
