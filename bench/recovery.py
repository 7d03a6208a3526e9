"""Recovery from interruptions: how fast, how much is redone, and is it exact.

    python bench/recovery.py [--jobs 4] [--interruptions-per-job 6] [--seed 11] [--quick]

A real BrightRun server (``python -m brightrun_server``, its own process,
SQLite, default recovery policy unless --initial-backoff is given) runs
tiny-model jobs with real trainers. First one job runs uninterrupted: its
per-step losses are the reference, and its cold start (attempt start to the
first completed training step) is the baseline; a second uninterrupted run at
the end measures it again, since the machine may be busier by then (the load
average is reported too). Then each job is interrupted
at seeded random steps, mixing SIGKILL (the worker is lost; up to a checkpoint
interval is redone) and SIGTERM (a preemption notice; the trainer checkpoints
and nothing is redone), by following its metric stream and signalling the
running attempt's trainer. Jobs run one at a time by default, so each
recovery is measured on the same quiet machine as the baseline.

Reported, over all interruptions:

* recovery time, kill -> the next training step completed: the server's
  ``Interruption.downtime`` (from the moment it settled the attempt) and the
  bench's own clock (from just before the signal to the completion time of the
  next attempt's first step), median / p95 / max, and p95 over the cold start;
* steps lost (redone) per interruption, median / max, by signal;
* success rate: jobs completed / jobs run;
* the max abs difference of the final per-step train losses from the reference;
* where the recovery time goes: kill -> the server settles the attempt
  (process exit noticed, outbox ingested; for SIGTERM the checkpoint written
  first), -> the next attempt starts (the policy's backoff, the scheduler), ->
  its first step completes (trainer start-up, restore, one step).

Goals (issue 5): recovery <= 10 s, steps lost <= the checkpoint interval (0 for
SIGTERM), success 100 %, loss difference 0.0. Progress goes to stderr; the
last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.e2e.harness: the fault tests' helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from brightrun.v1 import job_pb2
from tests.e2e.harness import (
    Api,
    Fault,
    Interrupter,
    final_curve,
    max_abs_difference,
    new_api_key,
    sigkill,
    sigterm,
    train_points,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "examples" / "data" / "support_chat.jsonl"
CHECKPOINT_INTERVAL = 5


def progress(message: str) -> None:
    print(f"[recovery] {message}", file=sys.stderr, flush=True)


def job_config(max_steps: int, seed: int, interval: int = CHECKPOINT_INTERVAL) -> job_pb2.TrainingConfig:
    """256 training examples in batches of 8: 32 steps an epoch, so a run crosses epochs."""
    return job_pb2.TrainingConfig(
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        learning_rate=5e-3,
        epochs=max(1, -(-max_steps // 32)),
        batch_size=8,
        max_seq_length=512,
        warmup_ratio=0.1,
        checkpoint_interval_steps=interval,
        max_steps=max_steps,
        seed=seed,
    )


def start_server(work: Path, slots: int, env_settings: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    ready = work / "port"
    env = dict(os.environ, BRIGHTRUN_LOG_LEVEL="WARNING", **env_settings)
    log = open(work / "server.log", "wb")  # noqa: SIM115 - the server keeps writing to it
    proc = subprocess.Popen(
        [sys.executable, "-m", "brightrun_server", "--port", "0", "--data-dir", str(work / "data"),
         "--ready-file", str(ready), "--max-concurrent-jobs", str(slots)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the BrightRun server did not start; see {work / 'server.log'}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def kill_leftovers(work: Path) -> None:
    """SIGKILL trainers of this run that outlived the server (after a failure)."""
    marker = str(work).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except OSError:
            continue


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
        "min": min(values),
    }


def seconds(ts: Any) -> float:
    return float(ts.seconds + ts.nanos / 1e9)


def cold_start(api: Api, job: job_pb2.Job) -> float:
    """Attempt start (PROVISIONING) to the completion of the first training step."""
    first = next(p for p in api.metrics(job.id) if p.HasField("train_loss"))
    return seconds(first.time) - seconds(job.start_time)


def make_plan(rng: random.Random, count: int, max_steps: int) -> list[tuple[int, Fault, str]]:
    faults: list[tuple[Fault, str]] = [(sigkill, "SIGKILL"), (sigterm, "SIGTERM")] * (count // 2 + 1)
    chosen = faults[:count]
    rng.shuffle(chosen)
    steps = sorted(rng.sample(range(2, max_steps - 9), count))
    return [(step, fault, name) for step, (fault, name) in zip(steps, chosen, strict=True)]


def interrupted_job(
    api: Api, dataset_id: str, model: str, config: job_pb2.TrainingConfig, plan: list[tuple[int, Fault, str]], n: int
) -> tuple[Interrupter, job_pb2.Job]:
    job = api.create(dataset_id, model, config, name=f"interrupted-{n}")
    interrupter = Interrupter(api, job.id, plan, timeout=900)
    try:
        interrupter.run()
    except Exception as e:  # a job that does not survive counts against the success rate
        progress(f"job {n}: {e!r}")
    done = api.wait(job.id, timeout=600)
    progress(
        f"job {n}: {job_pb2.Job.State.Name(done.state)} after {len(interrupter.injected)} interruptions "
        f"({', '.join(f'{i.signal_name}@{i.observed_step}' for i in interrupter.injected)})"
    )
    return interrupter, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--interruptions-per-job", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--parallel", type=int, default=1, help="interrupted jobs run at once")
    parser.add_argument("--seed", type=int, default=11, help="seed of the interruption plan")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer (0 = torch's default)")
    parser.add_argument(
        "--initial-backoff",
        type=float,
        default=None,
        help="seconds before an automatic retry (the server's default, 2 s, when not given)",
    )
    parser.add_argument("--quick", action="store_true", help="1 job x 4 interruptions (a smoke run, not the figure)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.interruptions_per_job = 1, 4

    from brightrun_trainer.tiny import build_tiny_model

    env_settings = {"BRIGHTRUN_TRAINER_THREADS": str(args.threads)} if args.threads else {}
    if args.initial_backoff is not None:
        env_settings["BRIGHTRUN_INITIAL_BACKOFF_SECONDS"] = str(args.initial_backoff)
    load_start = os.getloadavg()[0]
    config = job_config(args.max_steps, seed=1234)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {
        "bench": "recovery",
        "jobs": args.jobs,
        "interruptions_planned": args.jobs * args.interruptions_per_job,
        "max_steps": args.max_steps,
        "checkpoint_interval_steps": CHECKPOINT_INTERVAL,
        "trainer_threads": args.threads or None,
        "server_settings": env_settings,
        "parallel": args.parallel,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory(prefix="brightrun-recovery-") as tmp:
        work = Path(tmp)
        progress("building the tiny model...")
        model = str(build_tiny_model(work / "model"))
        api_key = new_api_key()
        proc, address = start_server(
            work, max(1, args.parallel), {**env_settings, "BRIGHTRUN_BOOTSTRAP_API_KEY": api_key}
        )
        api = Api.connect(address, api_key)
        try:
            dataset_id = api.upload(DATASET).id
            progress("reference run (uninterrupted)...")
            reference = api.wait(api.create(dataset_id, model, config, name="reference").id, timeout=600)
            if reference.state != job_pb2.Job.STATE_COMPLETED:
                raise RuntimeError(f"the reference run failed: {reference.state_message}")
            reference_losses = final_curve(api.metrics(reference.id))
            baseline = cold_start(api, reference)
            progress(f"reference: {len(reference_losses)} steps, cold start {baseline:.2f} s")

            plans = [make_plan(rng, args.interruptions_per_job, args.max_steps) for _ in range(args.jobs)]
            with ThreadPoolExecutor(max(1, args.parallel)) as pool:
                runs = list(
                    pool.map(lambda n: interrupted_job(api, dataset_id, model, config, plans[n], n), range(args.jobs))
                )

            downtime: list[float] = []
            wall: list[float] = []
            lost: dict[str, list[int]] = {"SIGKILL": [], "SIGTERM": []}
            unrecovered = 0
            differences: list[float] = []
            completed = 0
            # kill -> attempt settled by the server -> next attempt started -> its first step done
            phases: dict[str, list[float]] = {"settle": [], "wait": [], "restart": []}
            details: list[dict[str, Any]] = []
            for interrupter, job in runs:
                completed += job.state == job_pb2.Job.STATE_COMPLETED
                points = api.metrics(job.id)
                curve = final_curve(points)
                differences.append(max_abs_difference(curve, reference_losses))
                # Every point of every attempt, redone steps included, must match too.
                for _, step, loss in train_points(points):
                    differences.append(abs(loss - reference_losses.get(step, float("inf"))))
                records = {r.attempt: r for r in job.interruptions}
                starts = [
                    seconds(e.time) for e in api.coded(job.id, "STATE_CHANGED") if e.payload["to"] == "provisioning"
                ]
                for injected in interrupter.injected:
                    record = records.get(injected.attempt)
                    if record is None or not record.recovered:
                        unrecovered += 1
                        continue
                    downtime.append(record.downtime.ToTimedelta().total_seconds())
                    lost[injected.signal_name].append(record.steps_lost)
                    first = interrupter.first_points.get(injected.attempt + 1)
                    if first is None:
                        continue
                    wall.append(seconds(first.time) - injected.at)
                    settled = seconds(record.time)
                    started = min((t for t in starts if t >= settled), default=settled)
                    phases["settle"].append(settled - injected.at)
                    phases["wait"].append(started - settled)
                    phases["restart"].append(seconds(first.time) - started)
                    details.append(
                        {
                            "signal": injected.signal_name,
                            "step": record.step,
                            "steps_lost": record.steps_lost,
                            "recovery_seconds": round(wall[-1], 3),
                            "settle": round(settled - injected.at, 3),
                            "wait": round(started - settled, 3),
                            "restart": round(seconds(first.time) - started, 3),
                        }
                    )
            progress("second reference run (uninterrupted)...")
            again = api.wait(api.create(dataset_id, model, config, name="reference-again").id, timeout=600)
            differences.append(max_abs_difference(final_curve(api.metrics(again.id)), reference_losses))
            baselines = [baseline, cold_start(api, again)]
            injected_total = sum(len(i.injected) for i, _ in runs)
            recovery = summary(wall)
            result.update(
                {
                    "interruptions": injected_total,
                    "by_signal": {name: len(values) for name, values in lost.items()},
                    "unrecovered": unrecovered,
                    "recovery_seconds": recovery,
                    "server_downtime_seconds": summary(downtime),
                    "recovery_phases_seconds": {name: summary(values) for name, values in phases.items()},
                    "baseline_cold_start_seconds": baseline,
                    "baseline_cold_start_end_seconds": baselines[1],
                    "recovery_median_over_cold_start": recovery["median"] / statistics.mean(baselines)
                    if recovery
                    else None,
                    "recovery_p95_over_cold_start": recovery["p95"] / statistics.mean(baselines) if recovery else None,
                    "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
                    "steps_lost": {
                        name: {"median": statistics.median(values), "max": max(values)} if values else None
                        for name, values in lost.items()
                    },
                    "jobs_completed": completed,
                    "success_rate": completed / len(runs) if runs else 0.0,
                    "max_abs_loss_difference": max(differences) if differences else None,
                    "per_interruption": details,
                }
            )
            kill_lost = lost["SIGKILL"]
            result["goals"] = {
                "recovery_p95_le_10s": bool(recovery and recovery["p95"] <= 10.0),
                "steps_lost_le_interval": bool(all(v <= CHECKPOINT_INTERVAL for v in kill_lost)),
                "sigterm_steps_lost_zero": bool(lost["SIGTERM"]) and all(v == 0 for v in lost["SIGTERM"]),
                "success_rate_100": completed == len(runs) and unrecovered == 0,
                "loss_difference_zero": bool(differences) and max(differences) == 0.0,
                "at_least_20_interruptions": injected_total >= 20,
            }
        finally:
            api.close()
            stop_server(proc)
            kill_leftovers(work)
    if recovery:
        progress(
            f"recovery median {recovery['median']:.2f} s, p95 {recovery['p95']:.2f} s "
            f"(cold start {baseline:.2f} s); success {result['success_rate']:.0%}; "
            f"max loss difference {result['max_abs_loss_difference']}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
