"""When and how the SDK retries a failed call.

The rules (google api-core / AIP-194 style):

* ``UNAVAILABLE`` — retried for reads, for idempotent writes (``CancelJob``,
  ``PauseJob``, ``SwitchToOnDemand``, ``BulkCancelJobs`` by id) and for creates
  that carry a ``request_id`` (``CreateJob``, ``UploadDataset``, ``RetryJob``,
  ``ResumeFromCheckpoint``; the SDK always fills one and reuses it across
  attempts, so a retry can never create a second job). ``ResumeJob`` and
  ``DecideRecovery`` are retried too: a retry that finds the change already
  made (``JOB_STATE_CONFLICT`` with the job resumed / decided) returns the job.
  ``PromoteJob`` and a ``BulkCancelJobs`` by filter are not repeated. A call
  the server refused because it is shutting down (reason ``SHUTTING_DOWN``)
  never ran, so it is retried whatever it is.
* ``RESOURCE_EXHAUSTED`` — retried only when the server sent ``RetryInfo``,
  after the delay it names, for reads and idempotent writes. A key over its
  rate limit (reason ``RATE_LIMITED``) is refused before the call runs, so
  that is retried whatever the call is, like ``SHUTTING_DOWN``.
* ``DEADLINE_EXCEEDED`` — retried for reads only.
* Everything else is raised at once.

Delays grow exponentially from :attr:`RetryPolicy.initial` by
:attr:`RetryPolicy.multiplier` up to :attr:`RetryPolicy.maximum`, with full
jitter; a server's ``RetryInfo.retry_delay`` replaces the computed delay.
Streams (``stream_metrics``, ``watch``, ...) use the same policy to reconnect:
the attempt count resets whenever an item arrives.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import timedelta

import grpc

from brightrun.errors import ApiError

__all__ = ["DEFAULT_RETRY", "REFUSED_BEFORE_RUNNING", "CallKind", "RetryPolicy"]

#: Reasons of refusals made before the call ran (in the server's
#: interceptors): any call, even a plain write, is safe to repeat after them.
REFUSED_BEFORE_RUNNING = frozenset({"SHUTTING_DOWN", "RATE_LIMITED"})


class CallKind(enum.Enum):
    """How safe it is to repeat a call."""

    #: Reads: Get, List, streams.
    READ = "read"
    #: Writes that are safe to repeat: they carry a request_id, or repeating
    #: them cannot change the outcome (CancelJob, PauseJob).
    IDEMPOTENT = "idempotent"
    #: Writes that may not be repeated blindly (PromoteJob writes an audit entry each time).
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Args:
        max_attempts: attempts in total, the first included (1 disables retries).
        initial: delay before the first retry, in seconds.
        maximum: the longest delay between attempts, in seconds.
        multiplier: growth factor of the delay per attempt.
        jitter: draw each delay uniformly from [delay/2, delay] instead of
            using it exactly, so many clients do not retry in lock-step.
        max_server_delay: the longest ``RetryInfo`` delay honoured, in seconds;
            a server asking for more makes the error final.
    """

    max_attempts: int = 6
    initial: float = 0.25
    maximum: float = 8.0
    multiplier: float = 2.0
    jitter: bool = True
    max_server_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial < 0 or self.maximum < 0 or self.multiplier < 1:
            raise ValueError("initial and maximum must be >= 0 and multiplier >= 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        delay = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        if self.jitter:
            delay = random.uniform(delay / 2, delay)
        return delay

    def delay(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait before the next attempt after `error`."""
        if isinstance(error, ApiError) and error.retry_delay is not None:
            return max(0.0, error.retry_delay.total_seconds())
        return self.backoff(attempt)

    def should_retry(self, error: BaseException, kind: CallKind) -> bool:
        """Whether `error` from a call of `kind` is worth another attempt."""
        if not isinstance(error, ApiError):
            return False
        if error.retry_delay is not None and error.retry_delay > timedelta(seconds=self.max_server_delay):
            return False
        code = error.code
        repeatable = kind is not CallKind.WRITE or error.reason in REFUSED_BEFORE_RUNNING
        if code is grpc.StatusCode.UNAVAILABLE:
            return repeatable
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return error.retry_delay is not None and repeatable
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return kind is CallKind.READ
        return False

    def should_resume(self, error: BaseException) -> bool:
        """Whether a broken stream should be reopened from its cursor (a stream's
        own deadline running out is final)."""
        if isinstance(error, ApiError) and error.code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return False
        return self.should_retry(error, CallKind.READ)


#: The policy clients use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()

#: The policy of ``retry=None``: one attempt, streams do not reconnect.
NO_RETRY = RetryPolicy(max_attempts=1)
