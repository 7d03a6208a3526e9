"""Fixtures for trainer tests: a tiny model and an uninterrupted reference run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.trainer_harness import EXACT_PARAMS, THIRD_PARTY_WARNINGS, Attempt, make_spec, run_attempt


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            for spec in THIRD_PARTY_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brightrun_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def reference_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Attempt:
    """One uninterrupted run with EXACT_PARAMS; other tests compare against it."""
    job_dir = tmp_path_factory.mktemp("reference") / "job"
    attempt = run_attempt(make_spec(job_dir, tiny_model, **EXACT_PARAMS))
    assert attempt.proc.returncode == 0, (attempt.spec.attempt_dir / "stderr.txt").read_text()
    return attempt
