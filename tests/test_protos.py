"""The protocol contract: fresh generated stubs, a documented .proto, clean imports, exact metering."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from splitwave.protos import codec, metering
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"


# --------------------------------------------------------------------------------------------------
# generated code and the .proto itself
# --------------------------------------------------------------------------------------------------


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from splitwave.protos import generate

    written = generate.generate(tmp_path)
    stale = [p.name for p in written if p.read_bytes() != (PROTOS / p.name).read_bytes()]
    assert not stale, f"stale generated files {stale}: run `python -m splitwave.protos.generate`"


def test_protos_import_without_torch():
    code = (
        "import sys\n"
        "from splitwave.protos import codec, metering, splitwave_pb2, splitwave_pb2_grpc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnxruntime'))\n"
        "assert not bad, bad\n"
        "assert splitwave_pb2_grpc.splitwave__pb2 is splitwave_pb2\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_every_message_field_and_rpc_is_documented(tmp_path):
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    rc = protoc.main(
        ["protoc", f"-I{PROTOS}", "--include_source_info", f"--descriptor_set_out={out}", "splitwave.proto"]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (f,) = fds.file
    assert f.package == "splitwave.v1"
    documented = {tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()}
    missing = []
    for i, msg in enumerate(f.message_type):
        if (4, i) not in documented:
            missing.append(msg.name)
        missing += [f"{msg.name}.{fld.name}" for j, fld in enumerate(msg.field) if (4, i, 2, j) not in documented]
    for i, svc in enumerate(f.service):
        if (6, i) not in documented:
            missing.append(svc.name)
        missing += [f"{svc.name}.{m.name}" for j, m in enumerate(svc.method) if (6, i, 2, j) not in documented]
    assert not missing, f"undocumented in splitwave.proto: {missing}"


def test_service_shape():
    svc = pb.DESCRIPTOR.services_by_name["SplitWave"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert kinds == {
        "Join": (False, False),
        "GetBundle": (False, True),
        "Train": (True, True),
        "PushAdapter": (True, False),
        "AwaitRound": (False, True),
        "Evaluate": (True, True),
        "Leave": (False, False),
    }
    assert metering.SERVICE_NAME == "splitwave.v1.SplitWave"
    assert metering.reflection_service_names("x") == ("splitwave.v1.SplitWave", "grpc.health.v1.Health", "x")


# --------------------------------------------------------------------------------------------------
# metering over a real loopback server
# --------------------------------------------------------------------------------------------------


class _EchoServicer(pb_grpc.SplitWaveServicer):
    """Minimal servicer: enough behaviour to exercise every streaming shape."""

    def Join(self, request, context):
        return pb.JoinReply(client_id=request.client_name, session_token="tok0", run_id="run-1", manifest_json="{}")

    def GetBundle(self, request, context):
        data = bytes(range(256)) * 40
        for off in range(0, len(data), 4000):
            yield pb.BundleChunk(
                file_name="forward.onnx", offset=off, total_size=len(data), data=data[off : off + 4000]
            )

    def Train(self, request_iterator, context):
        asm = codec.Assembler()
        for req in request_iterator:
            if req.WhichOneof("body") == "frame":
                asm.add(req.frame)
                continue
            tensors = asm.finish()
            hdr = pb.Header(run_id=req.header.run_id, round=req.header.round, step=req.header.step)
            for frame in codec.encode("grad_h", 2 * tensors["h"]):
                yield pb.TrainReply(header=hdr, frame=frame)
            yield pb.TrainReply(
                header=hdr, end_step=pb.StepResult(loss=1.5, correct=1, count=int(tensors["labels"].size))
            )

    def PushAdapter(self, request_iterator, context):
        n = sum(1 for _ in request_iterator)
        return pb.AdapterReply(accepted=True, clients_reported=n)


@pytest.fixture()
def metered_server():
    meter = metering.ByteMeter()
    tokens = {"tok0": "edge-0"}

    def key_fn(request, context):
        header = getattr(request, "header", None)
        if header is not None and header.session_token:
            return tokens.get(header.session_token, "unknown")
        return metering.default_client_key(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metering.add_metered_servicer_to_server(_EchoServicer(), server, meter, key_fn)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", meter, server
    finally:
        server.stop(None)


def test_metered_stub_has_the_generated_stub_methods():
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        generated = pb_grpc.SplitWaveStub(channel)
        ours = metering.MeteredStub(channel, metering.ByteMeter(), "c")
        names = {m.name for m in metering.SERVICE.methods}
        assert all(hasattr(generated, n) and hasattr(ours, n) for n in names)


def test_bytes_counted_on_both_sides_agree_and_equal_message_sizes(metered_server):
    target, server_meter, _ = metered_server
    client_meter = metering.ByteMeter()
    seen: list[tuple[str, str, str, int]] = []
    lock = threading.Lock()

    def listen(*event):
        with lock:
            seen.append(event)

    client_meter.add_listener(listen)
    expected = {}  # (direction, method) -> sum of ByteSize()

    def count(direction, method, msgs):
        expected[(direction, method)] = expected.get((direction, method), 0) + sum(m.ByteSize() for m in msgs)

    rng = np.random.default_rng(0)
    # 2 x 16x64x384 steps, plus one 6.3 MB activation: above gRPC's 4 MiB default, so it only passes
    # because the codec frames it.
    steps = [rng.standard_normal((16, 64, 384)).astype(np.float32) for _ in range(2)]
    steps.append(rng.standard_normal((4, 1024, 384)).astype(np.float32))

    with grpc.insecure_channel(target) as channel:
        stub = metering.MeteredStub(channel, client_meter, "edge-0")
        join_req = pb.JoinRequest(client_name="edge-0", capabilities=pb.Capabilities(backend="onnxruntime"))
        join = stub.Join(join_req)
        count("up", "Join", [join_req])
        count("down", "Join", [join])

        bundle_req = pb.BundleRequest(header=pb.Header(session_token=join.session_token, run_id=join.run_id))
        chunks = list(stub.GetBundle(bundle_req))
        assert b"".join(c.data for c in chunks) == bytes(range(256)) * 40
        count("up", "GetBundle", [bundle_req])
        count("down", "GetBundle", chunks)

        train_reqs = []
        for step, h in enumerate(steps):
            hdr = pb.Header(session_token=join.session_token, run_id=join.run_id, round=0, step=step)
            labels = np.arange(h.shape[0], dtype=np.int64)
            for name, arr, c in (("h", h, "fp16"), ("labels", labels, "raw")):
                train_reqs += [pb.TrainRequest(header=hdr, frame=f) for f in codec.encode(name, arr, c)]
            train_reqs.append(pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=h.shape[0])))
        replies = list(stub.Train(iter(train_reqs)))
        count("up", "Train", train_reqs)
        count("down", "Train", replies)
        asm = codec.Assembler()
        results = []
        for r in replies:
            if r.WhichOneof("body") == "frame":
                asm.add(r.frame)
            else:
                results.append((r.end_step, asm.finish()))
        assert len(results) == len(steps)
        for h, (res, tensors) in zip(steps, results):
            assert res.count == h.shape[0]
            np.testing.assert_allclose(tensors["grad_h"], 2 * h, rtol=1e-3, atol=1e-7)

        hdr = pb.Header(session_token=join.session_token, run_id=join.run_id, round=0, step=2)
        factor = rng.standard_normal((8, 384)).astype(np.float32)
        push = [pb.AdapterRequest(header=hdr, frame=f) for f in codec.encode("lora_A", factor)]
        push.append(pb.AdapterRequest(header=hdr, end=pb.AdapterEnd(num_samples=48)))
        ack = stub.PushAdapter(iter(push))
        assert ack.accepted and ack.clients_reported == len(push)
        count("up", "PushAdapter", push)
        count("down", "PushAdapter", [ack])

    client = client_meter.snapshot()
    server = server_meter.snapshot()
    assert client == server
    assert set(client) == {("edge-0", d, m) for d, m in expected}
    for (direction, method), nbytes in expected.items():
        assert client[("edge-0", direction, method)] == nbytes, (direction, method)
    assert client_meter.total(direction="up") == sum(v for (d, _), v in expected.items() if d == "up")
    assert client_meter.messages(method="Train", direction="up") == len(train_reqs)
    assert server_meter.messages(method="Train", direction="down") == len(replies)
    assert sum(e[3] for e in seen) == client_meter.total()
    assert client_meter.clients() == ["edge-0"]


def test_reflection_and_health_can_serve_the_descriptor():
    reflection = pytest.importorskip("grpc_reflection.v1alpha.reflection")
    health_mod = pytest.importorskip("grpc_health.v1.health")
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metering.add_metered_servicer_to_server(_EchoServicer(), server, metering.ByteMeter())
    health = health_mod.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health.set(metering.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(metering.reflection_service_names(reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            assert {metering.SERVICE_NAME, metering.HEALTH_SERVICE_NAME} <= set(db.get_services())
            svc = DescriptorPool(db).FindServiceByName(metering.SERVICE_NAME)
            assert {m.name for m in svc.methods} >= {"Join", "Train", "AwaitRound"}
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=metering.SERVICE_NAME)
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_meter_is_thread_safe_and_filters():
    meter = metering.ByteMeter()

    def work(i):
        for _ in range(1000):
            meter.add(f"c{i % 2}", metering.UP if i % 3 else metering.DOWN, "Train", 3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.total() == 6 * 1000 * 3
    assert meter.messages() == 6000
    assert meter.total(client="c0") == 3 * 1000 * 3
    assert meter.total(direction=metering.DOWN) == 2 * 1000 * 3
    with pytest.raises(ValueError):
        meter.add("c", "sideways", "Train", 1)
    meter.reset()
    assert meter.total() == 0 and meter.snapshot() == {}


class _AsyncServicer(pb_grpc.SplitWaveServicer):
    """grpc.aio flavour of the echo servicer (coroutines and async generators)."""

    async def Join(self, request, context):
        return pb.JoinReply(client_id=request.client_name, session_token="tok0", run_id="run-1")

    async def Train(self, request_iterator, context):
        asm = codec.Assembler()
        async for req in request_iterator:
            if req.WhichOneof("body") == "frame":
                asm.add(req.frame)
                continue
            h = asm.finish()["h"]
            for frame in codec.encode("grad_h", -h):
                yield pb.TrainReply(header=req.header, frame=frame)
            yield pb.TrainReply(header=req.header, end_step=pb.StepResult(loss=0.5, count=h.shape[0]))

    async def PushAdapter(self, request_iterator, context):
        n = 0
        async for _ in request_iterator:
            n += 1
        return pb.AdapterReply(accepted=True, clients_reported=n)


def test_metering_works_with_grpc_aio_servers():
    import asyncio

    server_meter, client_meter = metering.ByteMeter(), metering.ByteMeter()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def serve():
        server = grpc.aio.server()
        metering.add_metered_servicer_to_server(_AsyncServicer(), server, server_meter, lambda req, ctx: "edge-0")
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["server"], state["stop"] = server, asyncio.Event()
        ready.set()
        await state["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        with grpc.insecure_channel(f"127.0.0.1:{state['port']}") as channel:
            stub = metering.MeteredStub(channel, client_meter, "edge-0")
            join = stub.Join(pb.JoinRequest(client_name="edge-0"))
            hdr = pb.Header(session_token=join.session_token, run_id=join.run_id)
            h = np.random.default_rng(1).standard_normal((4, 300, 384)).astype(np.float32)
            reqs = [pb.TrainRequest(header=hdr, frame=f) for f in codec.encode("h", h)]
            reqs.append(pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=4)))
            replies = list(stub.Train(iter(reqs)))
            grad = codec.decode([r.frame for r in replies if r.WhichOneof("body") == "frame"])["grad_h"]
            np.testing.assert_array_equal(grad, -h)
            assert stub.PushAdapter(iter(reqs[:3])).clients_reported == 3
            sent = sum(r.ByteSize() for r in reqs) + sum(r.ByteSize() for r in reqs[:3])
    finally:
        if "stop" in state:
            loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        loop.close()
    assert client_meter.snapshot() == server_meter.snapshot()
    assert (
        client_meter.total(direction="up", method="Train") + client_meter.total(direction="up", method="PushAdapter")
        == sent
    )
    assert client_meter.total(direction="down", method="Train") == sum(r.ByteSize() for r in replies)
