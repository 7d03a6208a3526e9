"""The published package: what the wheel holds, and that the base install (SDK +
CLI, no extras) works against a live server with no torch and no SQLAlchemy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_API_KEY, ServerHandle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("brightrun-*.whl")
    return path


def test_wheel_ships_code_data_stubs_and_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "brightrun/__init__.py",
        "brightrun/py.typed",
        "brightrun/v1/job_service_pb2.py",
        "brightrun/v1/job_service_pb2.pyi",
        "brightrun/v1/job_service_pb2_grpc.pyi",
        "brightrun/validation/__init__.py",
        "brightrun_server/domain/failure_rules.json",
        "brightrun_server/domain/estimate/gpus.json",
        "brightrun_server/domain/estimate/models.json",
        "brightrun_server/store/migrations/env.py",
        "brightrun_server/store/migrations/script.py.mako",
        "brightrun_trainer/spec.py",
    ]:
        assert required in names, f"{required} missing from the wheel"
    migrations = [n for n in names if n.startswith("brightrun_server/store/migrations/versions/") and n.endswith(".py")]
    assert migrations, "no migrations in the wheel"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert not any(name in r.lower() for r in base for name in ("torch", "sqlalchemy", "transformers")), base


def test_base_install_has_no_torch_and_the_client_works(wheel: Path, tmp_path: Path, server: ServerHandle) -> None:
    env_dir = tmp_path / "sdk-only"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = textwrap.dedent(
        f"""
        import importlib.util, sys
        import brightrun
        assert importlib.util.find_spec("torch") is None, "torch is installed"
        assert importlib.util.find_spec("sqlalchemy") is None, "sqlalchemy is installed"
        with brightrun.Client("{server.address}", api_key="{TEST_API_KEY}") as client:
            jobs = list(client.jobs.list())
            assert client.whoami().project == "default"
        report = brightrun.validate_file("{REPO / "examples" / "data" / "support_chat.jsonl"}")
        assert report.critical_count == 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sqlalchemy", "transformers"))
        assert not heavy, heavy
        print("ok", len(jobs))
        """
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok 0"
    cli = subprocess.run([str(env_dir / "bin" / "brightrun"), "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr[-2000:]
