"""Exact byte accounting at the transport: serialized message sizes per client, direction and method.

Counting happens inside the (de)serializers gRPC calls, so every message that actually crosses the
channel is counted once, with ``len(bytes)`` of its serialized form, and nothing has to be counted by
hand. The same numbers feed the reports and the virtual-time channel (via listeners), so both agree.

What is counted is protobuf payload bytes; gRPC adds a 5-byte length prefix per message
(:data:`GRPC_MESSAGE_PREFIX_BYTES`, derive it from :meth:`ByteMeter.messages`) plus HTTP/2 framing.

Client side: ``MeteredStub(channel, meter, client_key)`` instead of ``SplitWaveStub(channel)``.
Server side: ``server.add_generic_rpc_handlers((metered_handler(servicer, meter),))`` instead of
``add_SplitWaveServicer_to_server(servicer, server)`` (or :func:`add_metered_servicer_to_server`).
Works for ``grpc.server`` and ``grpc.aio.server`` servicers that take requests from the request
iterator and return/yield responses; ``context.read()``/``context.write()`` bypass the wrappers and are
not supported with metering.
"""

from __future__ import annotations

import inspect
import threading
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc

__all__ = [
    "UP",
    "DOWN",
    "SERVICE_NAME",
    "HEALTH_SERVICE_NAME",
    "GRPC_MESSAGE_PREFIX_BYTES",
    "ByteMeter",
    "MeteredStub",
    "metered_method_handlers",
    "metered_handler",
    "add_metered_servicer_to_server",
    "default_client_key",
    "reflection_service_names",
]

UP = "up"  # client -> server (requests)
DOWN = "down"  # server -> client (responses)
SERVICE = pb.DESCRIPTOR.services_by_name["SplitWave"]
SERVICE_NAME = SERVICE.full_name  # "splitwave.v1.SplitWave"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
GRPC_MESSAGE_PREFIX_BYTES = 5

Listener = Callable[[str, str, str, int], None]
Msg = Any  # a protobuf message (protobuf ships no type stubs)
KeyFn = Callable[[Msg | None, Any], str]  # (first request or None, servicer context) -> client key
Behavior = Callable[..., Any]  # a servicer method: (request or request iterator, context) -> response(s)


def reflection_service_names(*extra: str) -> tuple[str, ...]:
    """Service names to pass to ``grpc_reflection.v1alpha.reflection.enable_server_reflection``.

    Add ``reflection.SERVICE_NAME`` as ``extra`` (protos/ does not depend on grpcio-reflection).
    """
    return (SERVICE_NAME, HEALTH_SERVICE_NAME, *extra)


class ByteMeter:
    """Thread-safe byte and message totals keyed by (client, direction, method).

    Listeners ``fn(client, direction, method, nbytes)`` are called for every message after it is
    counted (e.g. to advance a virtual clock); they run on gRPC threads, so keep them quick.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str, str], int] = defaultdict(int)
        self._msgs: dict[tuple[str, str, str], int] = defaultdict(int)
        self._listeners: list[Listener] = []

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def add(self, client: str, direction: str, method: str, nbytes: int) -> None:
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {direction!r}")
        key = (client, direction, method)
        with self._lock:
            self._bytes[key] += nbytes
            self._msgs[key] += 1
            listeners = tuple(self._listeners)
        for fn in listeners:
            fn(client, direction, method, nbytes)

    @staticmethod
    def _sum(
        table: dict[tuple[str, str, str], int], client: str | None, direction: str | None, method: str | None
    ) -> int:
        return sum(
            v
            for (c, d, m), v in table.items()
            if (client is None or c == client)
            and (direction is None or d == direction)
            and (method is None or m == method)
        )

    def total(self, client: str | None = None, direction: str | None = None, method: str | None = None) -> int:
        """Bytes matching the given filters (None = any)."""
        with self._lock:
            return self._sum(self._bytes, client, direction, method)

    def messages(self, client: str | None = None, direction: str | None = None, method: str | None = None) -> int:
        """Number of messages matching the given filters (None = any)."""
        with self._lock:
            return self._sum(self._msgs, client, direction, method)

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        """Copy of the byte totals by (client, direction, method)."""
        with self._lock:
            return dict(self._bytes)

    def clients(self) -> list[str]:
        with self._lock:
            return sorted({c for c, _, _ in self._bytes})

    def reset(self) -> None:
        with self._lock:
            self._bytes.clear()
            self._msgs.clear()


def _message_class(desc: Any) -> type:
    return getattr(pb, desc.name)


def _method_kind(method: Any) -> str:
    return ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")


# --------------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------------


class MeteredStub:
    """Drop-in for ``SplitWaveStub`` whose (de)serializers count every message into ``meter``.

    ``client_key`` may be reassigned later (e.g. to the id returned by ``Join``); messages are attributed
    to the key current when they are (de)serialized.
    """

    # one multi-callable per method of the service, set in __init__ (typed here: callers see what they return)
    Join: Callable[..., pb.JoinReply]
    GetBundle: Callable[..., Iterator[pb.BundleChunk]]
    Train: Callable[..., Iterator[pb.TrainReply]]
    PushAdapter: Callable[..., pb.AdapterReply]
    AwaitRound: Callable[..., Iterator[pb.RoundReply]]
    Evaluate: Callable[..., Iterator[pb.EvalReply]]
    Leave: Callable[..., pb.LeaveReply]

    def __init__(self, channel: grpc.Channel, meter: ByteMeter, client_key: str):
        self.meter = meter
        self.client_key = client_key
        for method in SERVICE.methods:
            resp_cls = _message_class(method.output_type)
            factory = getattr(channel, _method_kind(method))
            setattr(
                self,
                method.name,
                factory(
                    f"/{SERVICE_NAME}/{method.name}",
                    request_serializer=self._serializer(method.name),
                    response_deserializer=self._deserializer(method.name, resp_cls),
                    _registered_method=True,
                ),
            )

    def _serializer(self, method: str) -> Callable[[Msg], bytes]:
        def serialize(msg: Msg) -> bytes:
            data = msg.SerializeToString()
            self.meter.add(self.client_key, UP, method, len(data))
            return data

        return serialize

    def _deserializer(self, method: str, cls: Any) -> Callable[[bytes], Msg]:
        def deserialize(data: bytes) -> Msg:
            self.meter.add(self.client_key, DOWN, method, len(data))
            return cls.FromString(data)

        return deserialize


# --------------------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------------------


def default_client_key(request: Msg | None, context: grpc.ServicerContext) -> str:
    """Key a call by the session token of its first request, else ``JoinRequest.client_name``, else peer."""
    if request is not None:
        header = getattr(request, "header", None)
        if header is not None and header.session_token:
            return header.session_token
        name = getattr(request, "client_name", "")
        if name:
            return name
    return context.peer()


class _Received:
    """A deserialized request with its wire size, unwrapped (and counted) inside the call's context."""

    __slots__ = ("msg", "nbytes")

    def __init__(self, msg: Msg, nbytes: int):
        self.msg, self.nbytes = msg, nbytes


class _ToSend:
    """A response tagged with the call's client key, so the serializer can attribute its bytes."""

    __slots__ = ("msg", "client")

    def __init__(self, msg: Msg, client: str):
        self.msg, self.client = msg, client


class _Call:
    """Per-call state: the client key, resolved from the first request (or the peer, if none yet)."""

    def __init__(self, context: Any, key_fn: KeyFn, meter: ByteMeter, method: str):
        self.context, self.key_fn, self.meter, self.method = context, key_fn, meter, method
        self.key: str | None = None

    def client(self, request: Msg | None = None) -> str:
        if self.key is None:
            self.key = self.key_fn(request, self.context)
        return self.key

    def received(self, rec: _Received) -> Msg:
        self.meter.add(self.client(rec.msg), UP, self.method, rec.nbytes)
        return rec.msg

    def requests(self, it: Iterable[_Received]) -> Iterator[Msg]:
        for rec in it:
            yield self.received(rec)

    def responses(self, it: Iterable[Msg]) -> Iterator[_ToSend]:
        for resp in it:
            yield _ToSend(resp, self.client())


def _wrap_async(kind: str, behavior: Behavior, method: str, meter: ByteMeter, key_fn: KeyFn) -> Behavior:
    """grpc.aio variant: servicer methods that are coroutines or async generators (iterator style)."""

    async def requests(call: _Call, it: AsyncIterable[_Received]) -> AsyncIterator[Msg]:
        async for rec in it:
            yield call.received(rec)

    async def responses(call: _Call, agen: AsyncIterable[Msg]) -> AsyncIterator[_ToSend]:
        async for resp in agen:
            yield _ToSend(resp, call.client())

    if kind == "unary_unary":

        async def unary_unary(request: _Received, context: Any) -> _ToSend | None:
            call = _Call(context, key_fn, meter, method)
            resp = await behavior(call.received(request), context)
            return None if resp is None else _ToSend(resp, call.client())

        return unary_unary
    if kind == "unary_stream":

        async def unary_stream(request: _Received, context: Any) -> AsyncIterator[_ToSend]:
            call = _Call(context, key_fn, meter, method)
            async for out in responses(call, behavior(call.received(request), context)):
                yield out

        return unary_stream
    if kind == "stream_unary":

        async def stream_unary(request_iterator: AsyncIterable[_Received], context: Any) -> _ToSend | None:
            call = _Call(context, key_fn, meter, method)
            resp = await behavior(requests(call, request_iterator), context)
            return None if resp is None else _ToSend(resp, call.client())

        return stream_unary

    async def stream_stream(request_iterator: AsyncIterable[_Received], context: Any) -> AsyncIterator[_ToSend]:
        call = _Call(context, key_fn, meter, method)
        async for out in responses(call, behavior(requests(call, request_iterator), context)):
            yield out

    return stream_stream


def _wrap_sync(kind: str, behavior: Behavior, method: str, meter: ByteMeter, key_fn: KeyFn) -> Behavior:
    """grpc.server variant: plain servicer methods and generators."""
    if kind == "unary_unary":

        def unary_unary(request: _Received, context: Any) -> _ToSend | None:
            call = _Call(context, key_fn, meter, method)
            resp = behavior(call.received(request), context)
            return None if resp is None else _ToSend(resp, call.client())

        return unary_unary
    if kind == "unary_stream":

        def unary_stream(request: _Received, context: Any) -> Iterator[_ToSend]:
            call = _Call(context, key_fn, meter, method)
            yield from call.responses(behavior(call.received(request), context))

        return unary_stream
    if kind == "stream_unary":

        def stream_unary(request_iterator: Iterable[_Received], context: Any) -> _ToSend | None:
            call = _Call(context, key_fn, meter, method)
            resp = behavior(call.requests(request_iterator), context)
            return None if resp is None else _ToSend(resp, call.client())

        return stream_unary

    def stream_stream(request_iterator: Iterable[_Received], context: Any) -> Iterator[_ToSend]:
        call = _Call(context, key_fn, meter, method)
        yield from call.responses(behavior(call.requests(request_iterator), context))

    return stream_stream


def _wrap_handler(
    method: str, handler: grpc.RpcMethodHandler, meter: ByteMeter, key_fn: KeyFn
) -> grpc.RpcMethodHandler:
    inner_deser = handler.request_deserializer
    inner_ser = handler.response_serializer

    def deserialize(data: bytes) -> _Received:
        return _Received(inner_deser(data), len(data))

    def serialize(out: _ToSend) -> bytes:
        data = inner_ser(out.msg)
        meter.add(out.client, DOWN, method, len(data))
        return data

    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behavior = getattr(handler, kind)

    is_async = inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    wrapped = (_wrap_async if is_async else _wrap_sync)(kind, behavior, method, meter, key_fn)
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(wrapped, request_deserializer=deserialize, response_serializer=serialize)


class _CaptureServer:
    """Stands in for a grpc.Server to capture the generated method table of add_SplitWaveServicer_to_server."""

    def __init__(self) -> None:
        self.method_handlers: dict[str, grpc.RpcMethodHandler] | None = None

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        pass

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.method_handlers = dict(method_handlers)


def metered_method_handlers(
    servicer: pb_grpc.SplitWaveServicer, meter: ByteMeter, client_key_fn: KeyFn = default_client_key
) -> dict[str, grpc.RpcMethodHandler]:
    """The generated ``{method: RpcMethodHandler}`` table with counting (de)serializers.

    ``client_key_fn(request_or_None, context) -> str`` is called once per call, with the first request.
    """
    capture = _CaptureServer()
    pb_grpc.add_SplitWaveServicer_to_server(servicer, capture)
    if capture.method_handlers is None:
        raise RuntimeError("generated add_SplitWaveServicer_to_server did not register method handlers")
    return {
        name: _wrap_handler(name, handler, meter, client_key_fn) for name, handler in capture.method_handlers.items()
    }


def metered_handler(
    servicer: pb_grpc.SplitWaveServicer, meter: ByteMeter, client_key_fn: KeyFn = default_client_key
) -> grpc.GenericRpcHandler:
    """A ``grpc.GenericRpcHandler`` serving ``servicer`` with byte metering."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, metered_method_handlers(servicer, meter, client_key_fn))


def add_metered_servicer_to_server(
    servicer: pb_grpc.SplitWaveServicer,
    server: grpc.Server,
    meter: ByteMeter,
    client_key_fn: KeyFn = default_client_key,
) -> None:
    """Metered equivalent of ``add_SplitWaveServicer_to_server``."""
    handlers = metered_method_handlers(servicer, meter, client_key_fn)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
