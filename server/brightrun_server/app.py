"""Wires the server together: store → services → API, plus scheduler and executor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from brightrun.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    project_service_pb2,
    project_service_pb2_grpc,
    queue_service_pb2,
    queue_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)
from brightrun_server.api import convert
from brightrun_server.api.drain import DrainInterceptor
from brightrun_server.api.feeds import FeedHub
from brightrun_server.api.interceptors import ErrorInterceptor
from brightrun_server.api.servicers import (
    ApiKeyServicer,
    DatasetServicer,
    JobServicer,
    ProjectServicer,
    QueueServicer,
    TrainerServicer,
)
from brightrun_server.domain.failures import default_rulebook
from brightrun_server.domain.recovery import RecoveryPolicy
from brightrun_server.executors.local import LocalExecutor
from brightrun_server.executors.providers import ComputeProvider, LocalProvider, SimulatedCloud
from brightrun_server.executors.scheduler import Scheduler
from brightrun_server.services.datasets import DatasetService
from brightrun_server.services.jobs import JobService
from brightrun_server.services.keys import ApiKeys
from brightrun_server.services.queue import QueueService
from brightrun_server.services.recovery import RecoveryService
from brightrun_server.settings import ServerSettings
from brightrun_server.store.db import Database
from brightrun_server.store.embedded import StoreLock, sqlite_path
from brightrun_trainer.spec import ReportTls

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name,
    project_service_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,
    trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    api_key_service_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
)


@dataclass(slots=True)
class Running:
    port: int
    address: str


class BrightRunServer:
    """One server process. `start()` binds and serves; `stop()` shuts down."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url)
        self.hub = FeedHub(max_subscribers_per_job=settings.max_subscribers_per_job)
        self.interceptor = ErrorInterceptor()
        self.drain = DrainInterceptor()
        self.health: HealthServicer | None = None
        self.server: aio.Server | None = None
        self.jobs: JobService | None = None
        self.datasets: DatasetService | None = None
        self.scheduler: Scheduler | None = None
        self.recovery: RecoveryService | None = None
        self.queue: QueueService | None = None
        self.keys: ApiKeys | None = None
        #: Where a freshly made admin key was written (a store without keys), else None.
        self.admin_key_file: Path | None = None
        db_file = sqlite_path(settings.resolved_database_url)
        #: Held while serving an SQLite file: proof that no other server uses it.
        self.store_lock = StoreLock(db_file) if db_file is not None else None

    async def start(self) -> Running:
        try:
            return await self._start()
        except BaseException:
            if self.store_lock is not None:
                self.store_lock.release()
            raise

    async def _start(self) -> Running:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if self.store_lock is not None:
            self.store_lock.acquire()
        await asyncio.to_thread(self.db.migrate)
        # Created here, not in __init__: an aio server binds to the running loop.
        self.health = HealthServicer()
        self.server = server = aio.server(
            interceptors=[self.drain, self.interceptor],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                # Replicas may share one address, so trainers keep reporting to it
                # whichever replica is alive.
                ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            ],
        )
        credentials = server_credentials(s)
        bind = f"{s.host}:{s.port}"
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"could not bind {s.host}:{s.port}")
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "[::]") else s.host
        address = s.advertise_address or f"{host}:{port}"
        self.keys = ApiKeys(self.db, rate_per_second=s.rate_limit_per_second, burst=s.rate_limit_burst)
        bootstrap = s.bootstrap_api_key.get_secret_value() if s.bootstrap_api_key else None
        self.admin_key_file = await self.keys.bootstrap(bootstrap, s.data_dir)
        self.interceptor.keys = self.keys
        self.datasets = DatasetService(
            self.db,
            s.data_dir,
            max_upload_bytes=s.max_upload_bytes,
            project_storage_bytes=s.project_storage_bytes,
            debug_log_data=s.debug_log_data,
        )
        self.jobs = JobService(
            self.db,
            data_dir=s.data_dir,
            publisher=self.hub,
            rulebook=default_rulebook(),
            report_address=address,
            report_tls=trainer_tls(s),
            trainer_threads=s.trainer_threads,
            heartbeat_seconds=s.heartbeat_seconds,
            debug_log_data=s.debug_log_data,
            recovery_defaults=RecoveryPolicy(
                max_system_retries=s.max_system_retries,
                initial_backoff_seconds=s.initial_backoff_seconds,
                max_backoff_seconds=s.max_backoff_seconds,
            ),
            quotas=s.project_quotas,
            default_quota_hours=s.default_quota_gpu_hours,
            provisioning_retry_seconds=s.provisioning_retry_seconds,
            provisioning_max_attempts=s.provisioning_max_attempts,
        )

        providers: dict[str, ComputeProvider] = {"local": LocalProvider(s.max_concurrent_jobs)}
        if s.simulated_cloud is not None:
            cloud = SimulatedCloud(s.simulated_cloud)
            providers[cloud.name] = cloud
            self.jobs.market = cloud
        self.jobs.default_pool = s.default_pool or ("simulated-cloud" if s.simulated_cloud else "local")
        if self.jobs.default_pool not in providers:
            raise ValueError(f"default_pool {self.jobs.default_pool!r} is not configured; pools: {sorted(providers)}")

        def executor(scheduler: Scheduler) -> LocalExecutor:
            return LocalExecutor(
                python=s.trainer_python,
                stop_grace_seconds=s.stop_grace_seconds,
                on_exit=scheduler.on_exit,
                memory_limit_bytes=s.trainer_memory_limit_bytes,
            )

        self.scheduler = Scheduler(
            self.jobs,
            executor,
            convert.read_outbox,
            providers=providers,
            stall_seconds=s.stall_seconds,
            replica_timeout_seconds=s.replica_timeout_seconds,
            # With the SQLite file locked, every earlier server on it is dead: take
            # over their trainers at once rather than after the replica timeout.
            sole_replica=self.store_lock is not None,
        )
        self.jobs.control = self.scheduler
        dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(self.datasets), server)
        self.recovery = RecoveryService(self.db, self.jobs)
        self.queue = QueueService(
            self.db,
            self.jobs,
            slots={name: provider.slots for name, provider in providers.items()},
            markets={name: provider for name, provider in providers.items() if provider.availability("") is not None},
            buffer=timedelta(seconds=s.provisioning_buffer_seconds),
            default_duration=timedelta(seconds=s.default_job_duration_seconds),
        )
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(self.jobs, self.recovery, self.queue, self.hub), server
        )
        queue_service_pb2_grpc.add_QueueServiceServicer_to_server(QueueServicer(self.queue, self.hub), server)
        project_service_pb2_grpc.add_ProjectServiceServicer_to_server(ProjectServicer(self.queue), server)
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.jobs), server)
        api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(self.keys), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        await self.server.start()
        await self.jobs.register_replica(address)
        await self.scheduler.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "BrightRun server listening on %s:%d (%s, database %s)",
            s.host,
            port,
            ("mutual TLS" if s.tls_client_ca_file else "TLS") if credentials else "plaintext",
            self.db.sync_url.render_as_string(),
        )
        return Running(port=port, address=address)

    async def stop(self, *, grace: float = 5.0, kill_workers: bool = False) -> None:
        """Graceful shutdown: refuse new calls and end open streams, both with
        UNAVAILABLE / SHUTTING_DOWN and RetryInfo (clients resume on the next
        server), let calls in flight finish for up to `grace` seconds, and leave
        trainers running unless `kill_workers` (they re-attach when a server
        starts on the same store)."""
        self.interceptor.shutting_down = True
        self.hub.close()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            await self.scheduler.stop()
            if kill_workers:
                await self.scheduler.executor.kill_all()
            else:
                await self.scheduler.executor.detach()
        if not await self.drain.wait_idle(grace):
            log.warning("%d call(s) still running after %.1fs; cancelling them", self.drain.active, grace)
        if self.jobs is not None:
            with contextlib.suppress(Exception):
                await self.jobs.unregister_replica()
        if self.server is not None:
            await self.server.stop(min(grace, 1.0))
        if self.keys is not None:
            await self.keys.close()
        await self.db.close()
        if self.store_lock is not None:
            self.store_lock.release()

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


def server_credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the port (None: plaintext). With a client CA, every
    client must present a certificate it signed — trainers included."""
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    client_ca = s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def trainer_tls(s: ServerSettings) -> ReportTls | None:
    """How trainers reach a TLS server: the CA to verify it, and their own
    certificate under mutual TLS. None for a plaintext server."""
    if s.tls_cert_file is None:
        return None
    return ReportTls(
        ca_file=s.trainer_tls_ca_file or s.tls_cert_file,
        cert_file=s.trainer_tls_cert_file,
        key_file=s.trainer_tls_key_file,
    )
