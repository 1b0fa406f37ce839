"""The server keeps the promises protos/splitwave.proto makes to a client written from it alone: Join refuses
unset or unknown capabilities by name, a gradient too big for the fp16 downlink still arrives (raw), adapters
travel int8/int4 only in a run that chose them and never top-k, a retried step gets the cached reply, and an unexpected server exception is a
status with a message (INTERNAL), never gRPC's bare UNKNOWN."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from net_helpers import ROOT, rpc_status, serving, tiny_cfg

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import decode, encode

C = grpc.StatusCode
CAPS = dict(protocol_version=1, backend="custom", codecs=["raw", "fp16"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One fp16-downlink server with one joined client whose round 0 is open."""
    cfg = tiny_cfg(training={"codec_down": "fp16"})
    with serving(cfg, tmp_path_factory.mktemp("run")) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        me = stub.Join(pb.JoinRequest(client_name="third-party", capabilities=pb.Capabilities(**CAPS)), timeout=10)
        hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=me.current_round)
        rnd = list(stub.AwaitRound(pb.RoundRequest(header=hdr, no_wait=True), timeout=30))
        d = rnd[-1].directives
        assert d.next_round == 0 and d.closed_round == 0 and not d.stop  # nothing closed yet: closed_round 0
        yield srv, stub, me


def _step(me, h, step, round_idx=0):
    b, sq = h.shape[:2]
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=round_idx, step=step)
    msgs = [pb.TrainRequest(header=hdr, frame=f) for f in encode("h", h)]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("attention_mask", np.ones((b, sq), np.int64))]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("labels", np.zeros(b, np.int64))]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=b))]


def _train(stub, msgs):
    replies = list(stub.Train(iter(msgs), timeout=60))
    frames = [r.frame for r in replies if r.WhichOneof("body") == "frame"]
    return frames, [r.end_step for r in replies if r.WhichOneof("body") == "end_step"]


@pytest.mark.parametrize(
    "caps, code, words",
    [
        (dict(CAPS, protocol_version=0), C.INVALID_ARGUMENT, ["protocol_version", "version 1"]),
        (dict(CAPS, protocol_version=2), C.FAILED_PRECONDITION, ["protocol version 2", "speaks 1"]),
        (dict(CAPS, backend=""), C.INVALID_ARGUMENT, ["backend", "'onnxruntime', 'torch', 'custom'"]),
        (dict(CAPS, backend="tensorflow"), C.INVALID_ARGUMENT, ["'tensorflow'", "'custom'"]),
        (dict(CAPS, codecs=["raw", "zstd"]), C.INVALID_ARGUMENT, ["'zstd'", "'fp16'"]),
        (dict(CAPS, training_modes=["fast"]), C.INVALID_ARGUMENT, ["'fast'", "'recompute'"]),
        (dict(CAPS, codecs=[]), C.FAILED_PRECONDITION, ["['fp16']"]),  # empty = raw only; this run sends fp16
    ],
)
def test_join_refuses_unset_or_unknown_capabilities_by_name(server, caps, code, words):
    _, stub, _ = server
    got, details = rpc_status(
        lambda: stub.Join(pb.JoinRequest(client_name="probe", capabilities=pb.Capabilities(**caps)), timeout=10)
    )
    assert got == code, details
    assert all(w in details for w in words), details


def test_all_zero_h_with_fp16_downlink_gets_its_gradient_raw(server):
    """An all-zero h makes the first layer norm's gradient ~1/sqrt(eps): beyond float16, so grad_h travels raw
    (the frames say so) instead of the stream dying with UNKNOWN."""
    _, stub, me = server
    hidden = json.loads(me.manifest_json)["hidden_size"]
    h = np.zeros((me.config.batch_size, 5, hidden), np.float32)  # seq 5 < max_seq_len: allowed
    frames, ends = _train(stub, _step(me, h, step=0))
    grad = decode(frames)["grad_h"]  # finite, or decode would refuse it
    assert grad.shape == h.shape and grad.dtype == np.float32 and len(ends) == 1
    big = np.abs(grad).max() >= 65520
    assert big, "the all-zero case is expected to exceed float16; if not, this test no longer covers the fallback"
    assert {f.codec for f in frames} == {"raw"}
    # an ordinary h on the same stream setup still gets fp16
    rng = np.random.default_rng(0)
    frames, _ = _train(stub, _step(me, rng.standard_normal(h.shape).astype(np.float32), step=1))
    assert {f.codec for f in frames} == {"fp16"}


def test_identical_retry_gets_the_cached_reply_and_a_changed_one_is_refused(server):
    _, stub, me = server
    hidden = json.loads(me.manifest_json)["hidden_size"]
    h = np.random.default_rng(1).standard_normal((me.config.batch_size, 4, hidden)).astype(np.float32)
    _, first = _train(stub, _step(me, h, step=2))
    _, again = _train(stub, _step(me, h, step=2))
    assert again[0].loss == first[0].loss
    code, details = rpc_status(lambda: _train(stub, _step(me, h + 1, step=2)))
    assert code == C.ALREADY_EXISTS and "duplicate" in details
    code, details = rpc_status(lambda: _train(stub, _step(me, h, step=1)))
    assert code == C.FAILED_PRECONDITION and "out of order" in details


def test_adapters_travel_int8_or_int4_only_when_the_run_allows_and_never_topk(server):
    """This run has no adapter codec (codec_adapter_up unset): factors go raw/fp16/bf16 only. A run that sets
    int8/int4 accepts those (tests/test_adapter_codecs.py); top-k is never accepted."""
    _, stub, me = server
    factors = json.loads(me.manifest_json)["factors"]
    name, shape = factors[0]["name"], factors[0]["shape"]
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=0, step=3)
    for codec_name in ("topk", "int8", "int4"):
        msgs = [
            pb.AdapterRequest(header=hdr, frame=f)
            for f in encode(name, np.ones(shape, np.float32), codec_name, topk_fraction=0.1)
        ]
        msgs.append(pb.AdapterRequest(header=hdr, end=pb.AdapterEnd(num_samples=8, local_steps=3)))
        code, details = rpc_status(lambda: stub.PushAdapter(iter(msgs), timeout=10))
        assert code == C.INVALID_ARGUMENT and codec_name in details and "'raw', 'fp16', 'bf16'" in details


def test_an_unexpected_exception_is_internal_with_a_message_never_unknown(server, monkeypatch):
    srv, stub, me = server

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(srv.app, "train_step", boom)  # streaming handler
    hidden = json.loads(me.manifest_json)["hidden_size"]
    code, details = rpc_status(lambda: _train(stub, _step(me, np.ones((2, 3, hidden), np.float32), step=9)))
    assert code == C.INTERNAL and "simulated bug" in details and "Train" in details
    monkeypatch.setattr(srv.app, "leave", boom)  # unary handler
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id)
    code, details = rpc_status(lambda: stub.Leave(pb.LeaveRequest(header=hdr), timeout=10))
    assert code == C.INTERNAL and "simulated bug" in details
    # a status the handler sets itself is kept as it is
    code, _ = rpc_status(lambda: stub.Leave(pb.LeaveRequest(header=pb.Header(session_token="x", run_id=me.run_id))))
    assert code == C.UNAUTHENTICATED


def test_the_proto_names_the_values_the_server_accepts():
    """The accepted backends, codecs and training modes are written in the proto, so the contract and the
    server cannot drift apart silently."""
    from splitwave.protos.codec import ADAPTER_CODECS, CODECS, FACTOR_CODECS
    from splitwave.server.service import BACKENDS, TRAINING_MODES

    text = (ROOT / "protos" / "splitwave.proto").read_text()
    backend_doc = text[text.index("message Capabilities") : text.index("string backend = 2;")]
    assert all(f'"{b}"' in backend_doc for b in BACKENDS)
    assert all(f'"{m}"' in text for m in TRAINING_MODES) and all(f'"{c}"' in text for c in CODECS)
    factor_codecs = ", ".join(f'"{c}"' for c in FACTOR_CODECS[:-1]) + f' or "{FACTOR_CODECS[-1]}"'
    assert f"uploaded LoRA factors use it only when it is {factor_codecs}" in text
    adapter_codecs = ", ".join(f'"{c}"' for c in ADAPTER_CODECS[:-1]) + f' or "{ADAPTER_CODECS[-1]}"'
    assert f'each\n//   {adapter_codecs}, never "topk"' in text
