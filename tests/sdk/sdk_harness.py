"""Real servers for the SDK tests.

* :class:`RestartableServer` — a BrightRun server that can be stopped and started
  again on the same port and data dir (trainers keep running across restarts).
* :class:`FlakyProxy` — a real gRPC server in front of a BrightRun server. Per
  method it first plays scripted failures (a status with ErrorInfo / RetryInfo
  details, optionally after passing some stream messages through), then forwards
  calls byte for byte. It records every request it received, so tests can check
  what the SDK sent on each attempt (e.g. the same request_id on a retry).
* :func:`fake_trainer` — an executable the server can run instead of
  ``python -m brightrun_trainer``: one that never reports (jobs stay in
  PROVISIONING until cancelled) or one that exits at once (jobs fail).
* :class:`Trainer` — plays the trainer of one attempt over the real
  TrainerService (a *scripted trainer*: the server launches
  :func:`sleeping_trainer`, the test reports stages, metrics, checkpoints and
  results with the attempt's token), so tests drive jobs into out-of-memory
  failures, pauses or escalations without training anything.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import stat
import threading
import warnings
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from brightrun.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    project_service_pb2,
    queue_service_pb2,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)

T = TypeVar("T")

TINY_JOB = {"max_seq_length": 512, "epochs": 1, "max_steps": 20}


class LoopThread:
    """An asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sdk-server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RestartableServer:
    """A BrightRun server on a fixed data dir that keeps its port across restarts."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.port = 0
        self._thread: LoopThread | None = None
        self._app: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._app is not None

    def start(self) -> RestartableServer:
        from brightrun_server.app import BrightRunServer
        from brightrun_server.settings import ServerSettings
        from tests.conftest import TEST_API_KEY

        # The environment's key (BRIGHTRUN_API_KEY) is this server's admin key,
        # unless the test asks for another bootstrap (None: a fresh server's own).
        settings = {"bootstrap_api_key": TEST_API_KEY, **self.settings}
        config = ServerSettings(port=self.port, data_dir=self.data_dir, **settings)
        thread = LoopThread()
        app = BrightRunServer(config)
        try:
            running = thread.run(app.start())
        except BaseException:
            thread.close()
            raise
        self.port = running.port
        self._thread, self._app = thread, app
        return self

    def stop(self, *, kill_workers: bool = False, grace: float = 1.0) -> None:
        if self._app is None or self._thread is None:
            return
        try:
            self._thread.run(self._app.stop(grace=grace, kill_workers=kill_workers))
        finally:
            self._thread.close()
            self._app = self._thread = None
            # A trainer detached by an earlier stop kept running under a loop that
            # is gone; its asyncio subprocess transport warns when collected
            # (a server-side wart, see the SDK report). Collect such leftovers
            # here, quietly, instead of in some later test.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()


def fake_trainer(directory: Path, *, behaviour: str) -> str:
    """An executable standing in for the trainer's Python: ``hang`` sleeps (the
    job stays in PROVISIONING until cancelled), ``fail`` exits 3 at once."""
    path = directory / f"fake-trainer-{behaviour}"
    body = {"hang": "exec sleep 3600", "fail": 'echo "fake trainer: exiting on purpose" >&2\nexit 3'}[behaviour]
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


# ---------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class Failure:
    """One scripted failure. `after` stream messages pass through first; `code`
    None ends the stream normally (an OK status) instead of failing it. With
    `after_forward` a unary call reaches the server and only its response is
    lost (the failure a request_id makes safe to retry)."""

    code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE
    retry_delay: float | None = None
    reason: str = "TEST_FAILURE"
    after: int = 0
    after_forward: bool = False
    message: str = "injected by FlakyProxy"


def _status(failure: Failure) -> grpc.Status:
    assert failure.code is not None
    details = [_pack(error_details_pb2.ErrorInfo(reason=failure.reason, domain="brightrun.dev"))]
    if failure.retry_delay is not None:
        seconds = int(failure.retry_delay)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((failure.retry_delay - seconds) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=failure.code.value[0], message=failure.message, details=details))


def _pack(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


_REQUEST_TYPES: dict[str, Any] = {}
_SHAPES: dict[str, tuple[bool, bool]] = {}
for _module, _service in (
    (job_service_pb2, job_service_pb2.DESCRIPTOR.services_by_name["JobService"]),
    (dataset_service_pb2, dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"]),
    (queue_service_pb2, queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"]),
    (project_service_pb2, project_service_pb2.DESCRIPTOR.services_by_name["ProjectService"]),
):
    for _method in _service.methods:
        _path = f"/{_service.full_name}/{_method.name}"
        _SHAPES[_path] = (_method.client_streaming, _method.server_streaming)
        _REQUEST_TYPES[_method.name] = getattr(_module, _method.input_type.name)


class FlakyProxy:
    """See the module docstring. Scripted failures are keyed by method name
    (``"GetJob"``); ``requests[name]`` lists the decoded requests of every attempt."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = grpc.insecure_channel(upstream)
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        self.requests: dict[str, list[Any]] = defaultdict(list)
        self.metadata: dict[str, list[dict[str, str]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fail(self, method: str, *failures: Failure) -> None:
        with self._lock:
            self.failures[method].extend(failures)

    def attempts(self, method: str) -> int:
        return len(self.requests[method])

    def close(self) -> None:
        self.server.stop(0).wait()
        self.upstream.close()

    def _next_failure(self, method: str) -> Failure | None:
        with self._lock:
            script = self.failures.get(method)
            return script.pop(0) if script else None

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> list[tuple[str, str]]:
        metadata = [(k, v) for k, v in context.invocation_metadata() if isinstance(v, str)]
        with self._lock:
            self.requests[method].append(request)
            self.metadata[method].append(dict(metadata))
        return [(k, v) for k, v in metadata if k not in ("user-agent",) and not k.startswith(("grpc-", ":"))]


def _remaining(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline (gRPC reports "none" as ~9e18 seconds)."""
    left = context.time_remaining()
    return None if left is None or left > 1e9 else left


def _abort_from(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    call: Any = error
    context.abort_with_status(_RpcStatus(call.code(), call.details() or "", tuple(call.trailing_metadata() or ())))


class _RpcStatus(collections.namedtuple("_RpcStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: FlakyProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path: str = details.method  # type: ignore[attr-defined]
        shape = _SHAPES.get(path)
        if shape is None:
            return None
        name = path.rsplit("/", 1)[-1]
        proxy = self.proxy
        decode = _REQUEST_TYPES[name].FromString

        if shape == (False, False):

            def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
                md = proxy._record(name, decode(request), context)
                failure = proxy._next_failure(name)
                if failure is not None and failure.code is not None and not failure.after_forward:
                    context.abort_with_status(_status(failure))
                try:
                    response = proxy.upstream.unary_unary(path)(request, metadata=md, timeout=_remaining(context))
                except grpc.RpcError as e:
                    _abort_from(context, e)
                    raise
                if failure is not None and failure.code is not None:
                    context.abort_with_status(_status(failure))
                return response

            return grpc.unary_unary_rpc_method_handler(unary)

        if shape == (True, False):

            def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
                messages = list(requests)
                md = proxy._record(name, [decode(m) for m in messages], context)
                failure = proxy._next_failure(name)
                if failure is not None and failure.code is not None:
                    context.abort_with_status(_status(failure))
                try:
                    return proxy.upstream.stream_unary(path)(iter(messages), metadata=md, timeout=_remaining(context))
                except grpc.RpcError as e:
                    _abort_from(context, e)
                    raise

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            md = proxy._record(name, decode(request), context)
            failure = proxy._next_failure(name)
            if failure is not None and failure.after == 0:
                if failure.code is None:
                    return
                context.abort_with_status(_status(failure))
            call = proxy.upstream.unary_stream(path)(request, metadata=md, timeout=_remaining(context))
            sent = 0
            try:
                for message in call:
                    yield message
                    sent += 1
                    if failure is not None and sent >= failure.after:
                        call.cancel()
                        if failure.code is None:
                            return
                        context.abort_with_status(_status(failure))
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.CANCELLED and failure is not None:  # type: ignore[attr-defined]
                    return
                _abort_from(context, e)

        return grpc.unary_stream_rpc_method_handler(unary_stream)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# ---------------------------------------------------------------------- scripted trainer


def sleeping_trainer(directory: Path) -> str:
    """An executable standing in for the trainer's Python that only sleeps,
    keeping its arguments (the spec path) so :class:`Trainer` can find it, and
    surviving SIGTERM like a trainer writing its last checkpoint would."""
    import sys

    path = directory / "sleeping-trainer"
    path.write_text(
        f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGTERM, lambda *_: None)\ntime.sleep(600)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


S = job_pb2.Stage
RESULT = trainer_service_pb2.AttemptResult


class Trainer:
    """The test's side of one attempt of a job on a server running
    :func:`sleeping_trainer` (built on tests/server's ScriptedAttempt)."""

    def __init__(self, address: str, job_id: str, attempt: int = 1) -> None:
        from tests.conftest import auth_channel
        from tests.server.conftest import Stubs, attach

        channel = auth_channel(address)  # finding the attempt reads the job (GetJob)
        stubs = Stubs(
            channel,
            dataset_service_pb2_grpc.DatasetServiceStub(channel),
            job_service_pb2_grpc.JobServiceStub(channel),
            trainer_service_pb2_grpc.TrainerServiceStub(channel),
        )
        self.channel = channel
        # attach() returns once the sleeper handles SIGTERM: a pause or cancel
        # sends it at once, and a sleeper still starting up would die of it.
        self.attempt = attach(stubs, job_id, attempt=attempt)

    def close(self) -> None:
        self.kill()
        self.channel.close()

    def kill(self) -> None:
        import contextlib
        import os
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.kill(self.attempt.pid, signal.SIGKILL)

    def to_training(self) -> None:
        for stage in (S.STAGE_PREPROCESSING, S.STAGE_MODEL_LOADING, S.STAGE_TRAINING):
            self.attempt.stage(stage)

    def steps(self, first: int, last: int) -> None:
        self.attempt.metrics(range(first, last + 1))

    def progress(self, step: int, total: int) -> None:
        report = trainer_service_pb2.ProgressReport(current_step=step, total_steps=total, epoch=step / total)
        self.attempt.send([self.attempt.next(progress=report)])

    def checkpoint(self, step: int) -> Path:
        """Write a real checkpoint with the trainer's own store and report it."""
        import json

        from brightrun_trainer.checkpoints import CheckpointStore

        job_dir = self.attempt.attempt_dir.parent.parent
        store = CheckpointStore(job_dir / "checkpoints")

        def payload(tmp: Path) -> None:
            (tmp / "adapter_model.safetensors").write_bytes(b"w" * 64)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))

        saved = store.save(step, payload, {"epoch": step / 100})
        report = trainer_service_pb2.CheckpointReport(
            step=step,
            epoch=step / 100,
            path=str(saved.path.relative_to(job_dir)),
            size_bytes=saved.size_bytes,
            manifest_sha256=saved.manifest_sha256,
        )
        self.attempt.send([self.attempt.next(checkpoint=report)])
        return saved.path

    def fail(self, exception_type: str, message: str, *, step: int = 0, stage: int = S.STAGE_TRAINING) -> None:
        failure = job_pb2.JobFailure(exception_type=exception_type, message=message, stage=stage, step=step)
        self.attempt.send([self.attempt.next(result=RESULT(outcome=RESULT.OUTCOME_FAILED, failure=failure))])
        self.kill()

    def stopped(self, step: int) -> None:
        """Report the end of an attempt that stopped on request (pause)."""
        self.attempt.send([self.attempt.next(result=RESULT(outcome=RESULT.OUTCOME_STOPPED, last_step=step))])
        self.kill()

    def directive(self) -> int:
        return self.attempt.send([]).directive
