"""Stored values fit their columns, on every store. SQLite ignores VARCHAR
lengths, so a value too long for its column only fails on PostgreSQL:
'awaiting_decision' (17 characters) once did not fit jobs.state (16), and every
job whose automatic recoveries ran out was force-failed there instead of waiting
for a decision."""

from __future__ import annotations

import signal
from enum import StrEnum
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from brightrun.v1 import job_pb2, job_service_pb2
from brightrun_server.domain.config import PresetName
from brightrun_server.domain.failures import FailureClass
from brightrun_server.domain.states import JobState
from brightrun_server.store.db import Database, compare_column_types
from brightrun_server.store.models import Base, FixOutcomeRow, JobRow
from tests.conftest import ServerHandle
from tests.server.conftest import Stubs, attach


@pytest.mark.parametrize(
    ("values", "column"),
    [
        (JobState, JobRow.__table__.c.state),
        (PresetName, JobRow.__table__.c.preset),
        (FailureClass, JobRow.__table__.c.recovering_class),
        (FailureClass, FixOutcomeRow.__table__.c.failure_class),
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v),
)
def test_every_domain_value_fits_its_column(values: type[StrEnum], column: sa.Column[str]) -> None:
    longest = max((v.value for v in values), key=len)
    assert isinstance(column.type, sa.String)
    assert column.type.length is not None
    assert len(longest) <= column.type.length, f"{longest!r} does not fit {column}"


def test_exhausted_recovery_waits_for_a_decision_on_every_store(scripted_any: tuple[ServerHandle, Stubs]) -> None:
    _, stubs = scripted_any
    dataset = stubs.upload_example()
    job = stubs.jobs.CreateJob(
        job_service_pb2.CreateJobRequest(
            dataset_id=dataset.id,
            base_model="scripted/model",
            recovery_policy=job_pb2.RecoveryPolicy(max_system_retries=0),
        )
    )
    stubs.wait_state(job.id, {job_pb2.Job.STATE_PROVISIONING})
    attach(stubs, job.id).kill(signal.SIGKILL)
    settled = stubs.wait_state(job.id, {job_pb2.Job.STATE_AWAITING_DECISION, job_pb2.Job.STATE_FAILED}, timeout=30)
    assert settled.state == job_pb2.Job.STATE_AWAITING_DECISION, settled.state_message
    assert settled.decision.choices
    assert settled.recovery.failure_class == job_pb2.FAILURE_CLASS_WORKER_LOST


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_migrations_build_the_schema_the_models_describe(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_schema_url") if store == "postgres" else f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    db.migrate()
    engine = sa.create_engine(db.sync_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": compare_column_types})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
