"""Every RPC a live server serves, found by walking its service descriptors
through server reflection, and a way to call any of them generically.

Tables keyed by method path (auth, isolation, fuzzing) compare themselves
with `served_methods()`, so a new RPC fails those suites until it is given a
row."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def _load_descriptors() -> None:
    """Import every generated module so the default pool knows each service."""
    import brightrun.v1

    for info in pkgutil.iter_modules(brightrun.v1.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"brightrun.v1.{info.name}")
    importlib.import_module("grpc_health.v1.health_pb2")
    importlib.import_module("grpc_reflection.v1alpha.reflection_pb2")


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def request_class(self) -> Any:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    @property
    def response_class(self) -> Any:
        return message_factory.GetMessageClass(self.descriptor.output_type)

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)


def served_methods(channel: grpc.Channel) -> dict[str, Rpc]:
    """Every method of every service the server lists through reflection."""
    _load_descriptors()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = sorted({s.name for r in responses for s in r.list_services_response.service})
    pool = descriptor_pool.Default()
    out: dict[str, Rpc] = {}
    for name in names:
        if name == "grpc.reflection.v1.ServerReflection":
            pool_name = "grpc.reflection.v1alpha.ServerReflection"  # same shape; v1 stubs are not generated here
            service = pool.FindServiceByName(pool_name)
        else:
            service = pool.FindServiceByName(name)
        for method in service.methods:
            out[f"/{name}/{method.name}"] = Rpc(f"/{name}/{method.name}", method)
    return out


def call(
    channel: grpc.Channel,
    rpc: Rpc,
    request: Any,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 10,
    max_items: int = 3,
) -> Any:
    """Call `rpc` with `request`; for client streaming, a list of messages is
    sent as the stream (a single message as a one-message stream); for server
    streaming, the first `max_items` responses as a list."""
    serialize = rpc.request_class.SerializeToString
    deserialize = rpc.response_class.FromString
    stream = list(request) if isinstance(request, list | tuple) else [request]
    if rpc.client_streaming and rpc.server_streaming:
        responses = channel.stream_stream(rpc.path, serialize, deserialize)(
            iter(stream), metadata=metadata, timeout=timeout
        )
        return _take(responses, max_items)
    if rpc.client_streaming:
        return channel.stream_unary(rpc.path, serialize, deserialize)(iter(stream), metadata=metadata, timeout=timeout)
    if rpc.server_streaming:
        responses = channel.unary_stream(rpc.path, serialize, deserialize)(request, metadata=metadata, timeout=timeout)
        return _take(responses, max_items)
    return channel.unary_unary(rpc.path, serialize, deserialize)(request, metadata=metadata, timeout=timeout)


def _take(responses: Iterator[Any], limit: int) -> list[Any]:
    out = []
    try:
        for item in responses:
            out.append(item)
            if len(out) >= limit:
                break
    finally:
        cancel = getattr(responses, "cancel", None)
        if cancel is not None:
            cancel()
    return out
