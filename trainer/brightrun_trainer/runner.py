"""One attempt, start to finish: stages, signals, failures and the result.

``run_attempt(spec)`` is what ``python -m brightrun_trainer run --spec FILE``
calls. It reports every stage through the :class:`~brightrun_trainer.report.Reporter`
and always ends with exactly one result: SUCCEEDED (adapter staged), STOPPED
(SIGTERM / SIGINT / server directive; a checkpoint was written when training had
started) or FAILED (with the exception type, message, stage, step and log tail,
dataset text redacted). The result is also written to ``result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from brightrun_trainer.callbacks import (
    Event,
    EventCode,
    EventType,
    FailureInfo,
    Outcome,
    ResultInfo,
    StageName,
    StageStatus,
    StepMetrics,
    TrainerCallback,
)
from brightrun_trainer.logs import TailHandler, redact, setup_logging
from brightrun_trainer.spec import EXIT_FAILED, EXIT_STOPPED, EXIT_SUCCEEDED, AttemptSpec

log = logging.getLogger(__name__)

#: Seconds the reporter may take to deliver what is pending at exit.
FLUSH_TIMEOUT = 12.0
ADAPTER_DIR = "adapter"
_FAILURE_CLASS_DATASET_FORMAT = 2
_STAGE_PROGRESS_INTERVAL = 0.25


class StopRequested(Exception):
    """A stop was requested before training started."""


class StopFlag:
    """Set by SIGTERM / SIGINT or the server's stop directive; read by the loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


def install_signal_handlers(stop: StopFlag) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        stop.request(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class AttemptRunner:
    """Runs the stages of one attempt against a callback."""

    def __init__(
        self,
        spec: AttemptSpec,
        callbacks: TrainerCallback,
        stop: StopFlag,
        tail: TailHandler | None = None,
    ) -> None:
        self.spec = spec
        self.tail = tail
        self.cb = callbacks
        self.stop = stop
        self.stage: StageName | None = None
        self._loop: Any = None
        self._last_progress = 0.0
        self._last_kind = ""
        self._stop_announced = False

    # -- stage helpers -----------------------------------------------------------

    def _begin(self, stage: StageName, message: str) -> None:
        self.stage = stage
        log.info("stage %s: %s", stage.name, message)
        self.cb.on_stage(stage, StageStatus.RUNNING, message, 0.0)
        self._last_progress = time.monotonic()
        self._last_kind = message.split(" ", 1)[0]

    def _progress(self, message: str, fraction: float) -> None:
        """Sub-status within the current stage; raises StopRequested if asked to stop.

        Finalization is not interrupted: training is complete by then and
        finishing takes less than a restart would.
        """
        assert self.stage is not None
        now = time.monotonic()
        kind = message.split(" ", 1)[0]
        # Repeats of one kind of message ("Tokenizing 64 of 500...") are throttled.
        if kind != self._last_kind or now - self._last_progress >= _STAGE_PROGRESS_INTERVAL:
            log.info("%s", message)
            self.cb.on_stage(self.stage, StageStatus.RUNNING, message, fraction)
            self._last_progress = now
            self._last_kind = kind
        if self.stage is not StageName.FINALIZATION:
            self._check_stop()

    def _end(self, message: str) -> None:
        assert self.stage is not None
        log.info("stage %s done: %s", self.stage.name, message)
        self.cb.on_stage(self.stage, StageStatus.SUCCEEDED, message, 1.0)

    def _check_stop(self) -> None:
        if self.stop():
            self._announce_stop()
            raise StopRequested(self.stop.reason)

    def _announce_stop(self) -> None:
        if not self._stop_announced:
            self._stop_announced = True
            log.info("stop requested (%s)", self.stop.reason)
            self.cb.info(
                EventCode.STOP_REQUESTED,
                f"Stop requested ({self.stop.reason})",
                reason=self.stop.reason,
            )

    # -- the attempt -------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimiser steps completed (restored ones included)."""
        return int(self._loop.state.step) if self._loop is not None else 0

    def run(self) -> ResultInfo:
        try:
            return self._run()
        except StopRequested:
            return ResultInfo(Outcome.STOPPED, last_step=self.step)
        except BaseException as e:
            return self._failure(e)

    def _run(self) -> ResultInfo:
        spec, params = self.spec, self.spec.params
        self._begin(StageName.PREPROCESSING, f"Loading tokenizer from {spec.base_model}...")
        _quiet_libraries()
        import torch

        from brightrun_trainer.data import prepare_dataset
        from brightrun_trainer.model import load_tokenizer

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self._check_stop()
        tokenizer, defaulted = load_tokenizer(spec.base_model)
        if defaulted:
            self.cb.info(
                EventCode.CHAT_TEMPLATE_DEFAULTED,
                "The tokenizer has no chat template; using BrightRun's plain-text template",
            )
        data = prepare_dataset(
            spec.dataset_path,
            spec.dataset_format,
            tokenizer,
            max_seq_length=params.max_seq_length,
            validation_split=params.validation_split,
            seed=params.seed,
            progress=self._progress,
        )
        stats = data.stats
        self.cb.info(
            EventCode.DATASET_LOADED,
            f"Dataset ready: {stats.trainable} trainable examples "
            f"({stats.train_examples} train / {stats.validation_examples} validation), "
            f"{stats.tokens} tokens",
            **stats.payload(),
        )
        if stats.truncated:
            self.cb.warning(
                EventCode.EXAMPLES_TRUNCATED,
                f"{stats.truncated} examples were truncated to {params.max_seq_length} tokens",
                count=stats.truncated,
                max_seq_length=params.max_seq_length,
            )
        if stats.dropped:
            dropped = sum(stats.dropped.values())
            self.cb.warning(
                EventCode.EXAMPLES_DROPPED,
                f"{dropped} examples cannot be trained on and were skipped",
                count=dropped,
                reasons=dict(stats.dropped),
            )
        if spec.debug_log_data and data.train:
            _log_example(tokenizer, data.train[0])
        self._end(f"{stats.train_examples} training, {stats.validation_examples} validation")

        # -- model loading --
        self._begin(StageName.MODEL_LOADING, f"Loading model from {spec.base_model}...")
        from brightrun_trainer.model import load_model

        _seed_everything(params.seed)
        loaded = load_model(spec.base_model, params, self._progress)
        self.cb.info(
            EventCode.MODEL_LOADED,
            f"Model loaded: {loaded.trainable_params:,} trainable of {loaded.total_params:,} parameters",
            trainable_params=loaded.trainable_params,
            total_params=loaded.total_params,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            quantization=str(params.quantization),
        )
        self._end(f"{loaded.trainable_params:,} trainable parameters on {loaded.device}")

        # -- training --
        self._begin(StageName.TRAINING, "Preparing training...")
        loop = self._make_loop(loaded, data, tokenizer.pad_token_id)
        outcome = loop.run()
        if outcome.stopped:
            self._announce_stop()
            return ResultInfo(
                Outcome.STOPPED,
                last_step=outcome.step,
                final_train_loss=outcome.final_train_loss,
            )
        self._end(f"Training complete at step {outcome.step}")

        # -- finalization --
        from brightrun_trainer.loop import eval_event, perplexity

        self._begin(StageName.FINALIZATION, "Saving LoRA adapters...")
        adapter_dir = self._save_adapter(loop.model)
        self.cb.info(
            EventCode.ADAPTER_SAVED,
            "LoRA adapter staged",
            path=os.path.relpath(adapter_dir, spec.job_dir),
        )
        self._progress("Calculating final metrics...", 0.6)
        eval_loss = outcome.last_eval_loss
        if outcome.last_eval_step != outcome.step:
            eval_loss = loop.evaluate()
            if eval_loss is not None:
                self.cb.on_metric(
                    StepMetrics(
                        step=outcome.step,
                        epoch=loop.plan.epoch_at(outcome.step),
                        eval_loss=eval_loss,
                        perplexity=perplexity(eval_loss),
                    )
                )
                self.cb.on_event(eval_event(outcome.step, eval_loss))
        final_perplexity = perplexity(eval_loss)
        self._end("Adapter saved" + (f", eval loss {eval_loss:.4f}" if eval_loss else ""))
        return ResultInfo(
            Outcome.SUCCEEDED,
            last_step=outcome.step,
            adapter_path=os.path.relpath(adapter_dir, spec.job_dir),
            final_eval_loss=eval_loss,
            final_perplexity=final_perplexity,
            final_train_loss=outcome.final_train_loss,
        )

    def _make_loop(self, loaded: Any, data: Any, pad_id: int) -> Any:
        from brightrun_trainer.checkpoints import CheckpointStore, verify_checkpoint
        from brightrun_trainer.config import TrainingPlan
        from brightrun_trainer.loop import TrainingLoop

        spec = self.spec
        plan = TrainingPlan.make(spec.params, len(data.train))
        store = CheckpointStore(spec.checkpoints_dir, keep=spec.keep_checkpoints)
        store.clean_partial()
        loop = TrainingLoop(
            loaded=loaded,
            data=data,
            params=spec.params,
            plan=plan,
            pad_id=pad_id,
            callbacks=self.cb,
            store=store,
            job_dir=spec.job_dir,
            attempt_number=spec.attempt_number,
            should_stop=self.stop,
            restart_schedule=spec.resume_from is not None and spec.lr_schedule_mode == "restart_warmup",
        )
        self._loop = loop

        def skipped(path: Path, why: str) -> None:
            self.cb.warning(
                EventCode.CHECKPOINT_SKIPPED,
                f"Skipped checkpoint {path.name}: {why}",
                path=os.path.relpath(path, spec.job_dir),
                reason=why,
            )

        verified = None
        if spec.resume_from is not None:
            path = spec.resume_from
            path = path if path.is_absolute() else spec.job_dir / path
            verified = verify_checkpoint(path)
            if path.parent.resolve() == store.root.resolve():
                store.supersede_after(verified.step)
        elif spec.resume:
            verified = store.find_resumable(skipped)
        else:
            store.supersede_after(-1)
        if verified is not None:
            self._progress(f"Restoring checkpoint {verified.path.name}...", 0.0)
            loop.restore(verified)
            if verified.path.parent.resolve() == store.root.resolve():
                store.point_latest(verified.path.name)
            self.cb.info(
                EventCode.RESUMED_FROM_CHECKPOINT,
                f"Resumed from checkpoint at step {loop.state.step}",
                step=loop.state.step,
                path=os.path.relpath(verified.path, spec.job_dir),
                manifest_sha256=verified.manifest_sha256,
            )
        plan = loop.plan
        self._progress(
            f"Training {plan.total_steps} steps ({plan.steps_per_epoch} per epoch) from step {loop.state.step}",
            loop.state.step / max(1, plan.total_steps),
        )
        return loop

    def _save_adapter(self, model: Any) -> Path:
        from brightrun_trainer.checkpoints import fsync_path

        staging = self.spec.staging_dir
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".{ADAPTER_DIR}-tmp-{secrets.token_hex(4)}"
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = self.spec.base_model
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
        final = staging / ADAPTER_DIR
        if final.exists():
            old = staging / f".{ADAPTER_DIR}-old-{secrets.token_hex(4)}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        fsync_path(staging)
        log.info("adapter saved to %s", final)
        return final

    def _failure(self, error: BaseException) -> ResultInfo:
        from brightrun.validation import DatasetFormatError

        exception_type = type(error).__name__
        message = redact(str(error))
        formatted = "".join(traceback.format_exception(error))
        where = self.stage.name if self.stage else "startup"
        log.error("attempt failed in %s: %s", where, redact(formatted))
        first_line = message.splitlines()[0] if message else ""
        reason = f"{exception_type}: {first_line}" if first_line else exception_type
        failure_class = 0
        if isinstance(error, DatasetFormatError) and self.stage is StageName.PREPROCESSING:
            failure_class = _FAILURE_CLASS_DATASET_FORMAT
        try:
            self.cb.on_event(
                Event(
                    EventType.ERROR,
                    EventCode.TRAINING_FAILED,
                    reason[:500],
                    {
                        "exception_type": exception_type,
                        "stage": self.stage.name if self.stage else None,
                        "step": self.step,
                    },
                )
            )
        except Exception:
            log.exception("could not report the failure event")
        tail = self.tail.tail() if self.tail is not None else ()
        return ResultInfo(
            Outcome.FAILED,
            last_step=self.step,
            failure=FailureInfo(
                exception_type=exception_type,
                message=message[:8000],
                reason=reason[:500],
                stage=self.stage,
                step=self.step,
                log_tail=tail,
                failure_class=failure_class,
            ),
        )


def _log_example(tokenizer: Any, item: Any) -> None:
    """With ``debug_log_data`` only: the first example as trained, targets marked."""
    from brightrun_trainer.data import IGNORE_INDEX

    pieces: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in [*zip(item.input_ids, item.labels, strict=True), (None, None)]:
        is_target = label is not None and label != IGNORE_INDEX
        if token is None or is_target != trained:
            if run:
                text = tokenizer.decode(run)
                pieces.append(f"[[{text}]]" if trained else text)
            run, trained = [], is_target
        if token is not None:
            run.append(token)
    log.info("debug_log_data: first training example, targets in [[ ]]:\n%s", "".join(pieces))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def write_result(path: Path, result: ResultInfo) -> None:
    from google.protobuf import json_format

    from brightrun_trainer.report import result_proto

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_format.MessageToDict(result_proto(result)), indent=2))
    os.replace(tmp, path)


def exit_code(result: ResultInfo) -> int:
    return {
        Outcome.SUCCEEDED: EXIT_SUCCEEDED,
        Outcome.STOPPED: EXIT_STOPPED,
        Outcome.FAILED: EXIT_FAILED,
    }[result.outcome]


def run_attempt(spec: AttemptSpec) -> int:
    """Run one attempt in this process; return the exit code."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while they wait collapse when the cores are shared
    # (the server, other trainers): measured 25x slower steps on 2 busy cores,
    # against about a third slower on idle ones with passive waiting. Must be set
    # before torch loads; set OMP_WAIT_POLICY=ACTIVE for a dedicated machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    stop = StopFlag()
    install_signal_handlers(stop)
    attempt_dir = spec.attempt_dir
    attempt_dir.mkdir(parents=True, exist_ok=True)
    tail = setup_logging(attempt_dir / "trainer.log")
    log.info(
        "attempt %s (job %s, attempt %d) starting, pid %d",
        spec.attempt_id,
        spec.job_id,
        spec.attempt_number,
        os.getpid(),
    )
    from brightrun_trainer.report import Reporter

    reporter = Reporter(
        attempt_id=spec.attempt_id,
        attempt_number=spec.attempt_number,
        outbox_path=attempt_dir / "reports.jsonl",
        target=spec.report,
        heartbeat_seconds=spec.heartbeat_seconds,
        on_stop_directive=lambda: stop.request("server directive"),
    )
    reporter.start()
    result = AttemptRunner(spec, reporter, stop, tail).run()
    log.info("attempt finished: %s at step %d", result.outcome.name, result.last_step)
    write_result(attempt_dir / "result.json", result)
    reporter.on_result(result)
    delivered = reporter.close(FLUSH_TIMEOUT)
    log.info("reports %s", "delivered" if delivered else "left in the outbox")
    return exit_code(result)


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
