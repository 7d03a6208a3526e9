"""Live feeds for the metric, event and job streams.

The database is the source of truth. The hub keeps, per job, a contiguous run
of the most recent metric and event responses (already converted to protos, so
a hundred subscribers share one conversion) and the last committed job row. A
subscriber takes the current wake-up signal *before* reading, so a change
committed after its read always wakes it; it reads from the cache when the
cache covers its cursor and from the database otherwise. Appends that would
break contiguity (two transactions publishing out of order) restart the cache
at the newer item — older sequences are then served from the database — so no
reader can ever see a gap or a duplicate.

At shutdown :meth:`FeedHub.close` wakes every reader and from then on
:meth:`FeedHub.check_open` raises UNAVAILABLE / SHUTTING_DOWN with a retry
delay, so each open stream ends with a status its client resumes from (at its
cursor, on the next server) instead of hanging until the transport is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from brightrun.v1 import job_service_pb2
from brightrun_server.api import convert
from brightrun_server.domain.errors import ResourceExhausted, Unavailable
from brightrun_server.store.models import EventRow, JobRow, MetricRow

T = TypeVar("T")


class _Run(Generic[T]):
    """A contiguous run of items with sequence numbers first..first+len-1."""

    __slots__ = ("first", "items", "limit")

    def __init__(self, limit: int) -> None:
        self.first = 0
        self.items: list[T] = []
        self.limit = limit

    def extend(self, first_seq: int, items: Sequence[T]) -> None:
        if not items:
            return
        end = self.first + len(self.items)
        if self.items and first_seq == end:
            self.items.extend(items)
        elif self.items and first_seq < end:
            # Already have some of these (a reset raced an older publish); keep the tail.
            overlap = end - first_seq
            if overlap < len(items):
                self.items.extend(items[overlap:])
        else:
            self.first = first_seq
            self.items = list(items)
        if len(self.items) > self.limit:
            drop = len(self.items) - self.limit // 2
            del self.items[:drop]
            self.first += drop

    def from_seq(self, seq: int, limit: int) -> list[T] | None:
        """Items from `seq` on; [] if `seq` is past the end; None if not cached."""
        if not self.items or seq < self.first:
            return None
        offset = seq - self.first
        return self.items[offset : offset + limit]

    @property
    def last_seq(self) -> int:
        return self.first + len(self.items) - 1 if self.items else 0


class _Feed:
    __slots__ = ("changed", "events", "job", "metrics")

    def __init__(self, limit: int) -> None:
        self.metrics: _Run[job_service_pb2.StreamJobMetricsResponse] = _Run(limit)
        self.events: _Run[job_service_pb2.StreamJobEventsResponse] = _Run(limit)
        self.job: JobRow | None = None
        self.changed = asyncio.Event()


class FeedHub:
    """Implements the job service's Publisher; read by the streaming servicers."""

    def __init__(
        self, *, max_items_per_job: int = 20_000, max_jobs: int = 512, max_subscribers_per_job: int = 1000
    ) -> None:
        self._feeds: OrderedDict[str, _Feed] = OrderedDict()
        self._limit = max_items_per_job
        self._max_jobs = max_jobs
        self._max_subscribers = max_subscribers_per_job
        #: Open streams per job.
        self._subscribers: Counter[str] = Counter()
        #: Bumped whenever a job changes state or place: the queue may have changed.
        self.queue_version = 1
        self._queue_changed = asyncio.Event()
        #: Set by close(): the server is shutting down.
        self.closed = False

    def close(self) -> None:
        """Shutdown: wake every reader; from now on every signal is already set
        and check_open() raises, so each stream ends at its next look."""
        self.closed = True
        for feed in self._feeds.values():
            feed.changed.set()
        self._queue_changed.set()

    @contextlib.contextmanager
    def subscription(self, job_id: str) -> Iterator[None]:
        """Count one open stream on `job_id` for the block; over the limit,
        RESOURCE_EXHAUSTED (TOO_MANY_SUBSCRIBERS) before anything is sent."""
        if self._subscribers[job_id] >= self._max_subscribers:
            raise ResourceExhausted(
                f"job {job_id} already has {self._subscribers[job_id]} open streams, the most this server allows "
                f"(max_subscribers_per_job = {self._max_subscribers}); share one stream or close another",
                reason="TOO_MANY_SUBSCRIBERS",
                metadata={"job_id": job_id, "limit": str(self._max_subscribers)},
                retry_after=5.0,
            )
        self._subscribers[job_id] += 1
        try:
            yield
        finally:
            self._subscribers[job_id] -= 1
            if self._subscribers[job_id] <= 0:
                del self._subscribers[job_id]

    def subscribers(self, job_id: str) -> int:
        return self._subscribers[job_id]

    def check_open(self) -> None:
        """Raise UNAVAILABLE (SHUTTING_DOWN, retry in 1 s) once the hub is closed."""
        if self.closed:
            raise Unavailable(
                "the server is shutting down; reconnect to resume from your cursor",
                reason="SHUTTING_DOWN",
                retry_after=1.0,
            )

    def bump_queue(self) -> None:
        self.queue_version += 1
        self._queue_changed.set()
        self._queue_changed = asyncio.Event()
        if self.closed:
            self._queue_changed.set()

    def queue_signal(self) -> asyncio.Event:
        return self._queue_changed

    def _feed(self, job_id: str) -> _Feed:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed(self._limit)
            while len(self._feeds) > self._max_jobs:
                _, evicted = self._feeds.popitem(last=False)
                evicted.changed.set()  # wake its readers; they fall back to the database
        else:
            self._feeds.move_to_end(job_id)
        return feed

    def _notify(self, feed: _Feed) -> None:
        feed.changed.set()
        feed.changed = asyncio.Event()
        if self.closed:
            feed.changed.set()

    # Publisher -------------------------------------------------------------

    def metrics_added(self, job_id: str, rows: Sequence[MetricRow]) -> None:
        feed = self._feed(job_id)
        feed.metrics.extend(
            rows[0].seq,
            [job_service_pb2.StreamJobMetricsResponse(metric=convert.metric(r)) for r in rows],
        )
        self._notify(feed)

    def events_added(self, job_id: str, rows: Sequence[EventRow]) -> None:
        feed = self._feed(job_id)
        feed.events.extend(
            rows[0].seq,
            [job_service_pb2.StreamJobEventsResponse(event=convert.event(r)) for r in rows],
        )
        self._notify(feed)

    def job_changed(self, job: JobRow) -> None:
        feed = self._feed(job.id)
        previous = feed.job
        if previous is None or job.version >= previous.version:
            feed.job = job
        self._notify(feed)
        if previous is None or previous.state != job.state or previous.promote_time != job.promote_time:
            self.bump_queue()

    # Readers ---------------------------------------------------------------

    def signal(self, job_id: str) -> asyncio.Event:
        """The event set by the next change to the job; take it before reading."""
        feed = self._feed(job_id)
        if self.closed:
            feed.changed.set()
        return feed.changed

    def job(self, job_id: str) -> JobRow | None:
        feed = self._feeds.get(job_id)
        return feed.job if feed else None

    def metrics_from(self, job_id: str, seq: int, limit: int) -> list[job_service_pb2.StreamJobMetricsResponse] | None:
        feed = self._feeds.get(job_id)
        return feed.metrics.from_seq(seq, limit) if feed else None

    def events_from(self, job_id: str, seq: int, limit: int) -> list[job_service_pb2.StreamJobEventsResponse] | None:
        feed = self._feeds.get(job_id)
        return feed.events.from_seq(seq, limit) if feed else None


async def wait_for(signal: asyncio.Event, poll_seconds: float) -> None:
    """Wait for a change, or at most `poll_seconds` (which catches changes made
    by another server replica, which this hub never hears about)."""
    # asyncio.timeout, not wait_for, which can swallow a cancellation on 3.11.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(poll_seconds):
            await signal.wait()
