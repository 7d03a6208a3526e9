"""Overhead of BrightRun's trainer, against plain Hugging Face and (later) via the server.

    python bench/overhead.py [--steps 60] [--repeats 3] [--threads 1] [--skip-direct]

Part 1 - loop overhead: optimiser steps per second of BrightRun's training loop
(:class:`brightrun_trainer.loop.TrainingLoop` with the production reporter
writing every metric and progress report to its outbox file) against a plain ``transformers.Trainer``
on the same tiny model, the same tokenized examples, batch size, sequence
length, LoRA configuration and number of steps, in the same process. Goal:
ratio (ours / HF) >= 1.0. Each side runs ``--repeats`` times, alternating, and
its best run counts (the machine is shared; the best run is the least
disturbed one). Steps per second are measured between the end of a warm-up
step and the end of the last step, so model loading is not included.

Part 1b - a direct trainer run: wall time of ``python -m brightrun_trainer run``
for a short job, and the time from process start to the first training step.

Part 2 - the same ~60 s job through the BrightRun server: wall time from the
start of the dataset upload to COMPLETED seen through the API, with the server
(``python -m brightrun_server``, its own process, SQLite, started beforehand
like a running service) launching the trainer, against
:func:`measure_direct_run` of the same trainer parameters in the same run (the
server's spec.json is checked to hold exactly the direct run's parameters).
Max length is 512, the server's smallest. Runs alternate; each side's best run
counts, as in part 1. Goal: ratio (server / direct) <= 1.05.

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from brightrun_trainer.tiny import DEMO_MODEL_ARGS, DEMO_PARAMS

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "examples" / "data" / "support_chat.jsonl"
#: The tiny demo model (about 1M parameters) and the LoRA / optimisation
#: settings both loops use (the demo job's, minus epochs and checkpoints).
MODEL_ARGS: dict[str, Any] = dict(DEMO_MODEL_ARGS)
PARAMS: dict[str, Any] = {
    **{k: v for k, v in DEMO_PARAMS.items() if k not in {"epochs", "checkpoint_interval_steps"}},
    "lora_dropout": 0.05,
    "gradient_accumulation_steps": 1,
    "seed": 42,
}
WARMUP_STEPS = 3


def progress(message: str) -> None:
    print(f"[overhead] {message}", file=sys.stderr, flush=True)


def build_model(directory: Path) -> Path:
    from brightrun.validation import iter_examples
    from brightrun_trainer.tiny import build_tiny_model

    corpus = [m.content for e in iter_examples(DATASET, "chat_jsonl") for m in e.messages]
    return build_tiny_model(directory, corpus=corpus, **MODEL_ARGS)


def _rate(times: list[float]) -> float:
    """Steps per second between the end of the warm-up step and the last step."""
    measured = times[WARMUP_STEPS - 1 :]
    return (len(measured) - 1) / (measured[-1] - measured[0])


# -- part 1: our loop vs transformers.Trainer --------------------------------------------


def run_ours(model_dir: Path, steps: int, work: Path) -> float:
    from brightrun_trainer.callbacks import StepMetrics
    from brightrun_trainer.checkpoints import CheckpointStore
    from brightrun_trainer.config import TrainingPlan
    from brightrun_trainer.data import prepare_dataset
    from brightrun_trainer.loop import TrainingLoop
    from brightrun_trainer.model import load_model, load_tokenizer
    from brightrun_trainer.report import Reporter
    from brightrun_trainer.spec import TrainingParams

    params = TrainingParams(**PARAMS, max_steps=steps, epochs=10, checkpoint_interval_steps=100_000)
    tokenizer, _ = load_tokenizer(str(model_dir))
    data = prepare_dataset(
        DATASET,
        "chat_jsonl",
        tokenizer,
        max_seq_length=params.max_seq_length,
        validation_split=0.0,  # no evaluation inside the measured steps, like the HF run
        seed=params.seed,
        progress=lambda _m, _p: None,
    )
    loaded = load_model(str(model_dir), params, lambda _m, _p: None)
    times: list[float] = []

    class Timer(Reporter):
        """The production reporter (outbox file, no server) plus a clock."""

        def on_metric(self, metrics: StepMetrics) -> None:
            super().on_metric(metrics)
            times.append(time.perf_counter())

    reporter = Timer(attempt_id="bench", attempt_number=1, outbox_path=work / "reports.jsonl", target=None)
    loop = TrainingLoop(
        loaded=loaded,
        data=data,
        params=params,
        plan=TrainingPlan.make(params, len(data.train)),
        pad_id=tokenizer.pad_token_id,
        callbacks=reporter,
        store=CheckpointStore(work / "checkpoints"),
        job_dir=work,
        attempt_number=1,
        should_stop=lambda: False,
    )
    loop.run()
    reporter.close()
    assert len(times) == steps
    return _rate(times)


def run_hf_trainer(model_dir: Path, steps: int, work: Path) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from brightrun_trainer.data import collate, prepare_dataset
    from brightrun_trainer.model import load_model, load_tokenizer
    from brightrun_trainer.spec import TrainingParams

    params = TrainingParams(**PARAMS, max_steps=steps, epochs=10)
    tokenizer, _ = load_tokenizer(str(model_dir))
    data = prepare_dataset(
        DATASET,
        "chat_jsonl",
        tokenizer,
        max_seq_length=params.max_seq_length,
        validation_split=0.0,
        seed=params.seed,
        progress=lambda _m, _p: None,
    )
    loaded = load_model(str(model_dir), params, lambda _m, _p: None)
    pad_id = tokenizer.pad_token_id

    def collator(features: list[Any]) -> dict[str, torch.Tensor]:
        batch = collate(features, pad_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

    times: list[float] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=params.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(params.warmup_ratio * steps)),
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        logging_steps=1,  # ours reports every step too
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=params.seed,
    )
    trainer = Trainer(
        model=loaded.model,
        args=args,
        train_dataset=data.train,  # a list of TokenizedExample; the collator pads them
        data_collator=collator,
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    trainer.train()
    assert len(times) == steps
    return _rate(times)


def compare_loops(model_dir: Path, steps: int, repeats: int, work: Path) -> dict[str, Any]:
    import torch

    ours: list[float] = []
    hf: list[float] = []
    runners: list[tuple[str, Callable[[Path, int, Path], float], list[float]]] = [
        ("brightrun", run_ours, ours),
        ("hf_trainer", run_hf_trainer, hf),
    ]
    for repeat in range(repeats):
        for name, runner, out in runners if repeat % 2 == 0 else runners[::-1]:
            rate = runner(model_dir, steps, work / f"{name}-{repeat}")
            out.append(rate)
            progress(f"{name} run {repeat + 1}/{repeats}: {rate:.2f} steps/s")
    return {
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "brightrun_steps_per_second": max(ours),
        "hf_trainer_steps_per_second": max(hf),
        "ratio": max(ours) / max(hf),
        "brightrun_runs": ours,
        "hf_trainer_runs": hf,
    }


# -- part 1b / 2: whole trainer processes ------------------------------------------------


def demo_spec(job_dir: Path, model_dir: Path, **overrides: Any) -> Any:
    """The demo job: 30-60 s on a 2-core machine, train loss falling from ~6.8 to ~1.5."""
    from brightrun_trainer.spec import AttemptSpec, TrainingParams

    params = {**PARAMS, **DEMO_PARAMS, **overrides}
    return AttemptSpec(
        job_id="job_bench",
        attempt_id="att_bench",
        attempt_number=1,
        job_dir=job_dir,
        dataset_path=DATASET,
        dataset_format="chat_jsonl",
        base_model=str(model_dir),
        params=TrainingParams(**params),
    )


def measure_direct_run(spec: Any) -> float:
    """Wall seconds of ``python -m brightrun_trainer run --spec`` for ``spec`` (an AttemptSpec)."""
    spec.attempt_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec.attempt_dir / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "brightrun_trainer", "run", "--spec", str(spec_path)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def run_timeline(spec: Any) -> dict[str, Any]:
    """Timing facts of a finished attempt, from its outbox."""
    reports = [json.loads(line) for line in (spec.attempt_dir / "reports.jsonl").read_text().splitlines()]

    def at(report: dict[str, Any]) -> float:
        return datetime.fromisoformat(report["time"].replace("Z", "+00:00")).timestamp()

    steps = [r for r in reports if "metric" in r and "trainLoss" in r["metric"]]
    first_stage = at(reports[0])
    losses = [r["metric"]["trainLoss"] for r in steps]
    return {
        "steps": len(steps),
        "first_report_to_first_step_seconds": at(steps[0]) - first_stage,
        "training_seconds": at(steps[-1]) - at(steps[0]),
        "steps_per_second": (len(steps) - 1) / (at(steps[-1]) - at(steps[0])),
        "first_train_loss": losses[0],
        "last_train_loss": losses[-1],
        "final_eval_loss": reports[-1]["result"].get("finalEvalLoss"),
    }


def direct_run(model_dir: Path, work: Path, **overrides: Any) -> dict[str, Any]:
    spec = demo_spec(work / "direct-job", model_dir, **overrides)
    launched = time.time()
    wall = measure_direct_run(spec)
    timeline = run_timeline(spec)
    reports = (spec.attempt_dir / "reports.jsonl").read_text().splitlines()
    first_step = next(json.loads(r) for r in reports if '"trainLoss"' in r)
    first_step_at = datetime.fromisoformat(first_step["time"].replace("Z", "+00:00")).timestamp()
    return {"wall_seconds": wall, "process_start_to_first_step_seconds": first_step_at - launched, **timeline}


# -- part 2: the same job through the server --------------------------------------------


def training_config(params: Any) -> Any:
    """A TrainingParams as CreateJob overrides, every field set (the server resolves nothing)."""
    from brightrun.v1 import job_pb2

    return job_pb2.TrainingConfig(
        lora_rank=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules),
        learning_rate=params.learning_rate,
        epochs=params.epochs,
        batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        warmup_ratio=params.warmup_ratio,
        max_seq_length=params.max_seq_length,
        lr_scheduler=job_pb2.LrScheduler.Value(f"LR_SCHEDULER_{params.lr_scheduler.value.upper()}"),
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        seed=params.seed,
        quantization=job_pb2.Quantization.Value(f"QUANTIZATION_{params.quantization.value.upper()}"),
        checkpoint_interval_steps=params.checkpoint_interval_steps,
        validation_split=params.validation_split,
        gradient_checkpointing=params.gradient_checkpointing,
        max_steps=params.max_steps,
        eval_interval_steps=params.eval_interval_steps,
    )


def new_api_key() -> str:
    """An admin key in the server's brk_<12>_<40> form, provisioned at start."""
    import secrets
    import string

    rng = secrets.SystemRandom()
    lower, both = string.ascii_lowercase + string.digits, string.ascii_letters + string.digits
    return f"brk_{''.join(rng.choice(lower) for _ in range(12))}_{''.join(rng.choice(both) for _ in range(40))}"


def start_server(work: Path, api_key: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m brightrun_server`` on a free port with its defaults (trainer threads: torch's, as direct)."""
    ready = work / "server-port"
    log = open(work / "server.log", "wb")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "brightrun_server", "--port", "0", "--data-dir", str(work / "server-data"),
         "--ready-file", str(ready)],
        env=dict(os.environ, BRIGHTRUN_LOG_LEVEL="WARNING", BRIGHTRUN_BOOTSTRAP_API_KEY=api_key),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the BrightRun server did not start; see {work / 'server.log'}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


def _seconds(ts: Any) -> float:
    return float(ts.seconds + ts.nanos / 1e9)


def measure_server_run(address: str, api_key: str, spec: Any, data_dir: Path) -> dict[str, Any]:
    """Upload, create, wait for COMPLETED through the API; the spec's parameters, the server's trainer."""
    import grpc

    from brightrun.v1 import (
        dataset_service_pb2,
        dataset_service_pb2_grpc,
        job_pb2,
        job_service_pb2,
        job_service_pb2_grpc,
    )

    channel = grpc.insecure_channel(address)
    auth = (("authorization", f"Bearer {api_key}"),)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    try:
        started = time.perf_counter()
        launched = time.time()
        data = spec.dataset_path.read_bytes()
        dataset = datasets.UploadDataset(
            iter([
                dataset_service_pb2.UploadDatasetRequest(
                    metadata=dataset_service_pb2.UploadDatasetMetadata(filename=spec.dataset_path.name)),
                *(dataset_service_pb2.UploadDatasetRequest(chunk=data[i : i + 65536])
                  for i in range(0, len(data), 65536)),
            ]),
            metadata=auth,
        )  # fmt: skip
        job = jobs.CreateJob(
            job_service_pb2.CreateJobRequest(
                dataset_id=dataset.id, base_model=spec.base_model, overrides=training_config(spec.params)
            ),
            metadata=auth,
        )
        terminal = {job_pb2.Job.STATE_COMPLETED, job_pb2.Job.STATE_FAILED, job_pb2.Job.STATE_CANCELLED}
        for update in jobs.WatchJob(job_service_pb2.WatchJobRequest(job_id=job.id), timeout=1800, metadata=auth):
            if update.job.state in terminal:
                job = update.job
                break
        wall = time.perf_counter() - started
        if job.state != job_pb2.Job.STATE_COMPLETED:
            raise RuntimeError(f"the job through the server ended {job_pb2.Job.State.Name(job.state)}")
        served = json.loads((data_dir / "jobs" / job.id / "attempts" / "1" / "spec.json").read_text())
        if served["params"] != spec.params.model_dump(mode="json"):
            raise RuntimeError(f"the server ran other parameters: {served['params']} vs {spec.params}")
        request = job_service_pb2.ListJobMetricsRequest(job_id=job.id, page_size=10000)
        points = jobs.ListJobMetrics(request, metadata=auth).metrics
        steps = [p for p in points if p.HasField("train_loss")]
        return {
            "wall_seconds": wall,
            "start_to_first_step_seconds": _seconds(steps[0].time) - launched,
            "steps": len(steps),
            "steps_per_second": (len(steps) - 1) / (_seconds(steps[-1].time) - _seconds(steps[0].time)),
            "last_train_loss": steps[-1].train_loss,
        }
    finally:
        channel.close()


def compare_server(model_dir: Path, work: Path, repeats: int, **overrides: Any) -> dict[str, Any]:
    overrides = {"max_seq_length": 512, **overrides}
    api_key = new_api_key()
    proc, address = start_server(work, api_key)
    server: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []
    try:
        for repeat in range(repeats):
            for side in ("direct", "server") if repeat % 2 == 0 else ("server", "direct"):
                if side == "direct":
                    direct.append(direct_run(model_dir, work / f"part2-{repeat}", **overrides))
                    progress(f"direct run {repeat + 1}/{repeats}: {direct[-1]['wall_seconds']:.1f} s")
                else:
                    spec = demo_spec(work / f"part2-server-{repeat}", model_dir, **overrides)
                    server.append(measure_server_run(address, api_key, spec, work / "server-data"))
                    progress(f"server run {repeat + 1}/{repeats}: {server[-1]['wall_seconds']:.1f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    best_server = min(r["wall_seconds"] for r in server)
    best_direct = min(r["wall_seconds"] for r in direct)
    if {r["last_train_loss"] for r in server} != {r["last_train_loss"] for r in direct}:
        raise RuntimeError("the server's runs and the direct runs trained differently")
    return {
        "repeats": repeats,
        "params": {k: v for k, v in overrides.items()},
        "server_wall_seconds": best_server,
        "direct_wall_seconds": best_direct,
        "ratio": best_server / best_direct,
        "goal_ratio": 1.05,
        "server_runs": server,
        "direct_runs": [{k: r[k] for k in ("wall_seconds", "process_start_to_first_step_seconds", "steps_per_second")}
                        for r in direct],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the loop comparison; 1 keeps it stable on a shared machine, 0 = torch's default",
    )
    parser.add_argument("--skip-direct", action="store_true", help="skip the direct trainer run")
    parser.add_argument("--direct-epochs", type=int, default=8, help="epochs of the direct (demo) run")
    parser.add_argument("--skip-server", action="store_true", help="skip part 2 (through the server)")
    parser.add_argument("--server-repeats", type=int, default=2, help="runs of each side in part 2")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result: dict[str, Any] = {"bench": "overhead"}
    with tempfile.TemporaryDirectory(prefix="brightrun-overhead-") as tmp:
        work = Path(tmp)
        progress("building the tiny model...")
        model_dir = build_model(work / "model")
        from brightrun_trainer.tiny import count_parameters

        result["model"] = {**MODEL_ARGS, "parameters": count_parameters(model_dir)}
        result["config"] = PARAMS
        progress(f"comparing loops over {args.steps} steps x {args.repeats} repeats...")
        result["loop"] = compare_loops(model_dir, args.steps, args.repeats, work)
        progress(f"ratio ours / HF Trainer = {result['loop']['ratio']:.3f}")
        if not args.skip_direct:
            progress(f"direct trainer run ({args.direct_epochs} epochs of the demo job)...")
            result["direct_run"] = direct_run(model_dir, work, epochs=args.direct_epochs)
            progress(f"direct run: {result['direct_run']['wall_seconds']:.1f} s")
        if not args.skip_server:
            progress(f"part 2: the demo job ({args.direct_epochs} epochs) through the server vs directly...")
            result["server_run"] = compare_server(model_dir, work, args.server_repeats, epochs=args.direct_epochs)
            progress(f"ratio server / direct = {result['server_run']['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
