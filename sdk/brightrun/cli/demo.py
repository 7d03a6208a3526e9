"""``brightrun demo``: one command from a fresh install to a trained adapter.

Starts ``python -m brightrun_server`` on a free port (SQLite and the local
executor under the data dir), builds the tiny local model if it is not there
yet, uploads the example dataset, creates a job with :data:`DEMO_CONFIG`, shows
the live view, and prints where the adapter is and how to load it. The server
(and a job still running) is stopped on exit, Ctrl-C included, unless
``--keep-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.syntax import Syntax
from rich.text import Text

import brightrun
from brightrun.cli._common import ExitCode, fail, stderr, stdout
from brightrun.cli.view import print_summary, watch_job
from brightrun.client import AsyncClient, Client
from brightrun.enums import CancelReason, JobState
from brightrun.errors import BrightRunError
from brightrun.types import JobBase

#: The demo job's training overrides (on top of the balanced preset) — the one
#: place to tune the demo. These are the trainer's tuned demo settings
#: (brightrun_trainer.tiny.DEMO_PARAMS) within the server's allowed ranges
#: (max_seq_length 512, the smallest it accepts): on 2 CPU cores the job takes
#: about a minute and the train loss falls from ~6.8 to below 1.
DEMO_CONFIG: dict[str, Any] = {
    "lora_rank": 16,
    "lora_alpha": 32,
    # A randomly initialised model learns mostly through its output layer.
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "learning_rate": 5e-3,
    "batch_size": 8,
    "max_seq_length": 512,
    "epochs": 8,
    "warmup_ratio": 0.03,
    "checkpoint_interval_steps": 50,
}
DEMO_JOB_NAME = "brightrun demo"
DEFAULT_DATA_DIR = Path("~/.brightrun/demo")
DATASET_NAME = "support_chat.jsonl"
SERVER_START_TIMEOUT = 120.0


def find_example_dataset() -> Path | None:
    """examples/data/support_chat.jsonl next to the source tree, or under the cwd."""
    candidates = [
        Path(brightrun.__file__).resolve().parents[2] / "examples" / "data" / DATASET_NAME,
        Path.cwd() / "examples" / "data" / DATASET_NAME,
    ]
    return next((p for p in candidates if p.is_file()), None)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require_extras() -> None:
    missing = [m for m in ("brightrun_server", "brightrun_trainer", "torch") if not _installed(m)]
    if missing:
        fail(
            f"the demo runs a server and a trainer, but {', '.join(missing)} "
            "is not installed; install everything with: pip install 'brightrun[all]'"
        )


class DemoServer:
    """``python -m brightrun_server`` as a child process in its own session (so
    Ctrl-C reaches the demo, which then stops the server in order)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        ready = Path(tempfile.mkdtemp(prefix="brightrun-demo-")) / "port"
        log = self.log_path.open("ab")
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [
            sys.executable,
            "-m",
            "brightrun_server",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--data-dir",
            str(self.data_dir),
        ]
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        self._ready_file = ready

    def admin_key(self) -> str:
        """The demo's admin key: the server's bootstrap key if one is configured,
        else the one it wrote into the data dir the first time it started."""
        configured = os.environ.get("BRIGHTRUN_BOOTSTRAP_API_KEY")
        if configured:
            return configured
        path = self.data_dir / "admin-api-key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            fail(
                f"{path} is missing, so the demo has no API key for the server in {self.data_dir}; "
                "set BRIGHTRUN_BOOTSTRAP_API_KEY or use a fresh --data-dir"
            )

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> str:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}; see {self.log_path}")
            text = self._ready_file.read_text() if self._ready_file.exists() else ""
            if text.strip().isdigit():
                self.port = int(text.strip())
                return f"127.0.0.1:{self.port}"
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start within {timeout:.0f}s; see {self.log_path}")

    def stop(self, grace: float = 20.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)


def _build_model(model_dir: Path, dataset: Path, console: Console) -> Path:
    """The trainer's demo model (about 1M parameters), its tokenizer trained on
    the dataset's text too; built once per data dir."""
    if (model_dir / "config.json").is_file():
        return model_dir
    console.print(Text(f"building the tiny demo model in {model_dir} …", style="dim"))
    from brightrun.validation import iter_examples

    # Imported by name so the SDK's type check does not follow into the trainer.
    tiny = importlib.import_module("brightrun_trainer.tiny")
    try:
        corpus = [m.content for example in iter_examples(dataset) for m in example.messages]
    except Exception:  # the dataset is validated on upload; any text will do here
        corpus = []
    return Path(tiny.build_tiny_model(model_dir, corpus=corpus, **tiny.DEMO_MODEL_ARGS))


def _upload(client: Client, dataset: Path, console: Console) -> brightrun.Dataset:
    if console.is_terminal:
        with Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), console=console, transient=True) as bar:
            task = bar.add_task("upload", total=dataset.stat().st_size)
            return client.datasets.upload(
                dataset, progress=lambda sent, total: bar.update(task, completed=sent, total=total)
            )
    return client.datasets.upload(dataset)


def _stop_job(client: Client, job_id: str, console: Console) -> None:
    try:
        job = client.jobs.get(job_id)
        if job.is_terminal:
            return
        console.print(Text(f"cancelling {job_id} …", style="yellow"))
        job.cancel(reason=CancelReason.CLIENT_REQUEST, note="brightrun demo interrupted")
        job.wait(timeout=60)
    except BrightRunError as e:
        console.print(Text(f"could not cancel {job_id}: {e}", style="red"))


def load_snippet(base_model: Path, adapter: str) -> str:
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")\n'
        f'model = PeftModel.from_pretrained(base, "{adapter}")\n'
    )


def run_demo(*, data_dir: Path | None, dataset: Path | None, keep_server: bool, epochs: int | None = None) -> int:
    """Run the demo; return the process exit code."""
    _require_extras()
    out, err = stdout(), stderr()
    data_dir = (data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    dataset = dataset or find_example_dataset()
    if dataset is None or not dataset.is_file():
        fail(f"cannot find examples/data/{DATASET_NAME}; pass --dataset PATH")

    server = DemoServer(data_dir)
    job_id: str | None = None
    client: Client | None = None
    final: JobBase | None = None
    out.print(Text.assemble(("BrightRun demo", "bold"), f" — data in {data_dir}"))
    previous = _interrupt_on(signal.SIGTERM, signal.SIGHUP)
    server.start()
    try:
        model_dir = _build_model(data_dir / "models" / "tiny-llama-demo", dataset, err)
        target = server.wait_ready()
        out.print(Text(f"server on {target} (log: {server.log_path})", style="dim"))
        api_key = server.admin_key()
        client = Client(target, api_key=api_key)
        client.wait_until_ready(timeout=30)
        ds = _upload(client, dataset, err)
        out.print(
            Text(
                f"dataset {ds.id}: {ds.stats.training_pairs:,} examples, quality {ds.validation.quality_score}/100",
                style="dim",
            )
        )
        config = {**DEMO_CONFIG, **({"epochs": epochs} if epochs else {})}
        job = client.jobs.create(dataset=ds, base_model=str(model_dir), name=DEMO_JOB_NAME, **config)
        job_id = job.id
        out.print(Text(f"job {job.id} created; following it live (Ctrl-C stops the demo)", style="dim"))

        async def follow() -> JobBase:
            async with AsyncClient(target, api_key=api_key) as aclient:
                return await watch_job(aclient, job.id, out)

        final = asyncio.run(follow())
        print_summary(out, final)
        if final.state is JobState.COMPLETED and final.output is not None:
            out.print()
            out.print(Text("Load the adapter with peft:", style="bold"))
            out.print(Syntax(load_snippet(model_dir, final.output.adapter_path), "python", theme="ansi_dark"))
            return ExitCode.OK
        return ExitCode.CANCELLED if final.state is JobState.CANCELLED else ExitCode.FAILED
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
    except RuntimeError as e:
        fail(str(e))
    finally:
        if keep_server and server.process is not None and server.process.poll() is None:
            out.print(
                Text(
                    f"server still running on 127.0.0.1:{server.port} (pid {server.process.pid}); "
                    f"stop it with: kill {server.process.pid}",
                    style="dim",
                )
            )
        else:
            if client is not None and job_id is not None and (final is None or not final.is_terminal):
                _stop_job(client, job_id, err)
            server.stop()
        if client is not None:
            client.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt_on(*signals: signal.Signals) -> dict[signal.Signals, Any]:
    """Treat `signals` like Ctrl-C (so a closed terminal or a `kill` still stops
    the job and the server); return the handlers to restore."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, interrupt) for sig in signals}
