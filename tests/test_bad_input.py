"""Hostile or broken messages get a clear gRPC status and do not change what honest clients get.

Each case runs the tiny config with one honest edge; after its second step of round 0, the case fires one
bad message sequence with a raw stub (often using the honest client's own token: the checks must hold even
for a peer that stole it) and checks the status code and message. The honest client's final adapters must
equal those of a run with no bad traffic, bit for bit.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from net_helpers import CAPS, ROOT, assert_same_factors, run_with_attack, tiny_cfg

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import encode

EDGE_CACHE = ROOT / ".cache" / "edge-tests"
B, S, H = 8, 16, 32  # batch, sequence, hidden of the tiny config


def _run(tmp_path, attack=None):
    """Run the honest client; `attack(stub, joined)` fires after step 1 of round 0. Returns (factors, result, srv)."""
    return run_with_attack(
        tmp_path, tiny_cfg(), EDGE_CACHE, attack and (lambda stub, joined, app: attack(stub, joined))
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"))[0]


def _hdr(j, round_idx=0, step=2, token=None, run_id=None):
    return pb.Header(
        session_token=j.session_token if token is None else token,
        run_id=j.run_id if run_id is None else run_id,
        round=round_idx,
        step=step,
    )


def _step(j, h=None, mask=None, labels=None, **hk):
    """Messages of one Train step (valid unless told otherwise)."""
    rng = np.random.default_rng(1)
    h = rng.standard_normal((B, S, H)).astype(np.float32) if h is None else h
    mask = np.ones((B, S), np.int64) if mask is None else mask
    labels = np.zeros(B, np.int64) if labels is None else labels
    hdr = _hdr(j, **hk)
    msgs = [
        pb.TrainRequest(header=hdr, frame=f)
        for name, a in (("h", h), ("attention_mask", mask), ("labels", labels))
        for f in encode(name, a)
    ]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=B))]


def _train(stub, msgs, timeout=10):
    try:
        for _ in stub.Train(iter(msgs), timeout=timeout):
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def truncated_frame(stub, j):
    (f,) = encode("h", np.zeros((B, S, H), np.float32))
    cut = pb.TensorFrame()
    cut.CopyFrom(f)
    cut.payload = f.payload[: len(f.payload) // 2]
    msgs = _step(j)
    msgs[0] = pb.TrainRequest(header=msgs[0].header, frame=cut)
    return _train(stub, msgs)


def frame_missing(stub, j):
    # frames that are not a tensor's last must carry >= server.limits.min_frame_bytes (64 KiB): a larger h
    frames = encode("h", np.zeros((8 * B, S, H), np.float32), max_frame_bytes=70_000)
    msgs = _step(j)
    msgs[0:1] = [pb.TrainRequest(header=msgs[0].header, frame=f) for f in frames[:-1]]  # last frame never comes
    return _train(stub, msgs)


def oversized_message(stub, j):
    big = pb.TensorFrame(
        name="h", dtype="uint8", shape=[3 << 20], codec="raw", frame_index=0, frame_count=1, payload=b"\0" * (3 << 20)
    )
    return _train(stub, [pb.TrainRequest(header=_hdr(j), frame=big)])


def huge_shape(stub, j):
    f = pb.TensorFrame(
        name="h",
        dtype="float32",
        shape=[1 << 20, 1 << 20, H],
        codec="raw",
        frame_index=0,
        frame_count=1,
        payload=b"\0" * 64,
    )
    return _train(stub, [pb.TrainRequest(header=_hdr(j), frame=f)])


def negative_shape(stub, j):
    f = pb.TensorFrame(
        name="h", dtype="float32", shape=[B, -1, H], codec="raw", frame_index=0, frame_count=1, payload=b"\0" * 64
    )
    return _train(stub, [pb.TrainRequest(header=_hdr(j), frame=f)])


def wrong_shape(stub, j):
    return _train(stub, _step(j, h=np.zeros((B, S, H - 1), np.float32)))


def wrong_dtype(stub, j):
    return _train(stub, _step(j, labels=np.zeros(B, np.float32)))


def unknown_dtype(stub, j):
    f = pb.TensorFrame(
        name="h", dtype="complex64", shape=[2], codec="raw", frame_index=0, frame_count=1, payload=b"\0" * 16
    )
    return _train(stub, [pb.TrainRequest(header=_hdr(j), frame=f)])


def nan_activations(stub, j):
    h = np.zeros((B, S, H), np.float32)
    h[0, 0, 0] = np.nan
    return _train(stub, _step(j, h=h))


def inf_activations(stub, j):
    h = np.zeros((B, S, H), np.float32)
    h[1, 2, 3] = -np.inf
    return _train(stub, _step(j, h=h))


def bad_labels(stub, j):
    return _train(stub, _step(j, labels=np.full(B, 7, np.int64)))


def unexpected_tensor(stub, j):
    msgs = _step(j)
    (f,) = encode("evil", np.zeros(4, np.float32))
    msgs.insert(0, pb.TrainRequest(header=msgs[0].header, frame=f))
    return _train(stub, msgs)


def unknown_session(stub, j):
    return _train(stub, _step(j, token="not-a-token"))


def wrong_run_id(stub, j):
    return _train(stub, _step(j, run_id="someone-elses-run"))


def step_out_of_order(stub, j):
    return _train(stub, _step(j, step=0))


def duplicate_step(stub, j):
    return _train(stub, _step(j, step=1))


def wrong_round(stub, j):
    return _train(stub, _step(j, round_idx=5))


def switch_token(stub, j):
    msgs = _step(j)
    msgs[1] = pb.TrainRequest(header=_hdr(j, token="x" * 43), frame=msgs[1].frame)
    return _train(stub, msgs)


def steps_interleaved(stub, j):
    msgs = _step(j)
    msgs[1] = pb.TrainRequest(header=_hdr(j, step=3), frame=msgs[1].frame)
    return _train(stub, msgs)


def empty_stream(stub, j):
    return _train(stub, [])


def _join(stub, name: str):
    try:
        stub.Join(pb.JoinRequest(client_name=name, capabilities=CAPS), timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def join_when_full(stub, j):
    return _join(stub, "intruder")


def join_bad_name(stub, j):
    return _join(stub, "../../etc/passwd")


def _push(stub, j, factors: dict, round_idx=0):
    hdr = _hdr(j, round_idx=round_idx)
    msgs = [pb.AdapterRequest(header=hdr, frame=f) for k, v in factors.items() for f in encode(k, v)]
    msgs.append(pb.AdapterRequest(header=hdr, end=pb.AdapterEnd(num_samples=8, local_steps=1)))
    try:
        stub.PushAdapter(iter(msgs), timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def push_wrong_shape(stub, j):
    import json

    names = [f["name"] for f in json.loads(j.manifest_json)["factors"]]
    return _push(stub, j, {names[0]: np.zeros((4, 7), np.float32)})


def push_unknown_factor(stub, j):
    return _push(stub, j, {"base_model.model.evil.lora_A.weight": np.zeros((4, 4), np.float32)})


def push_float64(stub, j):
    import json

    f = json.loads(j.manifest_json)["factors"][0]
    return _push(stub, j, {f["name"]: np.zeros(f["shape"], np.float64)})


def push_nan(stub, j):
    import json

    f = json.loads(j.manifest_json)["factors"][0]
    a = np.zeros(f["shape"], np.float32)
    a[0, 0] = np.nan
    return _push(stub, j, {f["name"]: a})


def push_missing_factors(stub, j):
    import json

    f = json.loads(j.manifest_json)["factors"][0]
    return _push(stub, j, {f["name"]: np.zeros(f["shape"], np.float32)})  # one factor of many


def await_unknown_session(stub, j):
    try:
        for _ in stub.AwaitRound(pb.RoundRequest(header=_hdr(j, token="nope")), timeout=10):
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def bundle_unknown(stub, j):
    try:
        for _ in stub.GetBundle(pb.BundleRequest(header=_hdr(j), bundle_hash="0" * 32), timeout=10):
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def vanish_mid_stream(stub, j):
    """Half a step, then the client is gone (call cancelled): no status to check, the server must cope."""
    msgs = _step(j)
    gate = threading.Event()

    def gen():
        yield msgs[0]
        gate.wait(5)

    call = stub.Train(gen())
    time.sleep(0.3)
    call.cancel()
    gate.set()
    return grpc.StatusCode.CANCELLED, "cancelled by the client"


C = grpc.StatusCode
CASES = [
    (truncated_frame, C.INVALID_ARGUMENT, "truncated"),
    (frame_missing, C.INVALID_ARGUMENT, "incomplete"),
    (oversized_message, C.RESOURCE_EXHAUSTED, "larger than max"),
    (huge_shape, C.RESOURCE_EXHAUSTED, "exceeds the limit"),
    (negative_shape, C.INVALID_ARGUMENT, "negative dimension"),
    (wrong_shape, C.INVALID_ARGUMENT, "h must be float"),
    (wrong_dtype, C.INVALID_ARGUMENT, "labels must be integers"),
    (unknown_dtype, C.INVALID_ARGUMENT, "unknown dtype"),
    (nan_activations, C.INVALID_ARGUMENT, "NaN or Inf"),
    (inf_activations, C.INVALID_ARGUMENT, "NaN or Inf"),
    (bad_labels, C.INVALID_ARGUMENT, "labels must be in"),
    (unexpected_tensor, C.INVALID_ARGUMENT, "unexpected tensor"),
    (unknown_session, C.UNAUTHENTICATED, "session token"),
    (wrong_run_id, C.FAILED_PRECONDITION, "run id"),
    (step_out_of_order, C.FAILED_PRECONDITION, "out of order"),
    (duplicate_step, C.ALREADY_EXISTS, "duplicate"),
    (wrong_round, C.FAILED_PRECONDITION, "round 5 is not open"),
    (switch_token, C.PERMISSION_DENIED, "may not change its session token"),
    (steps_interleaved, C.INVALID_ARGUMENT, "before step"),
    (empty_stream, C.INVALID_ARGUMENT, "empty stream"),
    (join_when_full, C.RESOURCE_EXHAUSTED, "slots are taken"),
    (join_bad_name, C.INVALID_ARGUMENT, "client_name"),
    (push_wrong_shape, C.INVALID_ARGUMENT, "shape"),
    (push_unknown_factor, C.INVALID_ARGUMENT, "unknown factor"),
    (push_float64, C.INVALID_ARGUMENT, "float32"),
    (push_nan, C.INVALID_ARGUMENT, "NaN or Inf"),
    (push_missing_factors, C.INVALID_ARGUMENT, "missing"),
    (await_unknown_session, C.UNAUTHENTICATED, "session token"),
    (bundle_unknown, C.NOT_FOUND, "unknown bundle"),
    (vanish_mid_stream, C.CANCELLED, "cancelled"),
]


@pytest.mark.parametrize("attack,code,text", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_refused_and_harmless(tmp_path, reference, attack, code, text):
    factors, (got_code, details), srv = _run(tmp_path, attack)
    assert got_code == code, f"{attack.__name__}: got {got_code} {details!r}"
    assert text.lower() in details.lower(), details
    assert_same_factors(factors, reference)
    # nothing left behind: the honest client left, no round is open, no session lingers
    assert not srv.app.sessions and not srv.app.by_client


def _packed_step(j, **over):
    """Messages of one packed Train step (h [tokens, H] + row_lengths; valid unless told otherwise; a tensor
    given as None is left out)."""
    t = {"h": np.zeros((4 * B, H), np.float32), "row_lengths": np.full(B, 4, np.int32), "labels": np.zeros(B, np.int64)}
    t.update(over)
    hdr = _hdr(j)
    msgs = [pb.TrainRequest(header=hdr, frame=f) for name, a in t.items() if a is not None for f in encode(name, a)]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=B))]


PACKED_CASES = [
    (dict(row_lengths=np.full(B, 4.0)), C.INVALID_ARGUMENT, "row_lengths must be integers"),
    (dict(row_lengths=np.array([4] * (B - 1) + [0], np.int32)), C.INVALID_ARGUMENT, "row_lengths must be in"),
    (dict(row_lengths=np.array([4] * (B - 1) + [S + 1], np.int32)), C.INVALID_ARGUMENT, "row_lengths must be in"),
    (dict(h=np.zeros((4 * B - 1, H), np.float32)), C.INVALID_ARGUMENT, f"sum(row_lengths) = {4 * B}"),
    (dict(h=np.zeros((4 * B, H - 1), np.float32)), C.INVALID_ARGUMENT, "packed h must be float"),
    (dict(h=np.zeros((B, 4, H), np.float32)), C.INVALID_ARGUMENT, "packed h must be float"),
    (dict(labels=np.zeros(B + 1, np.int64)), C.INVALID_ARGUMENT, f"labels must be integers of shape [{B}]"),
    (dict(attention_mask=np.ones((B, 4), np.int64)), C.INVALID_ARGUMENT, "unexpected tensors ['attention_mask']"),
    (dict(h=None), C.INVALID_ARGUMENT, "step lacks tensors ['h']"),
    # 600 rows of one token and one of S: a small message whose padded layout is over the step limit
    (
        dict(
            row_lengths=np.array([S] + [1] * 599, np.int32),
            h=np.zeros((S + 599, H), np.float16),
            labels=np.zeros(600, np.int8),
        ),
        C.RESOURCE_EXHAUSTED,
        "rebuilds to h [600, 16, 32]",
    ),
]


def test_bad_packed_steps_are_refused_and_harmless(tmp_path, reference):
    """Broken packed steps (splitwave.proto, TrainRequest "Packed step"), fired one after another with the
    honest client's token mid-round: each refused with its status and a message naming the problem, and the
    honest client's final adapters are those of a run without them."""

    def attack(stub, j):
        return [_train(stub, _packed_step(j, **over)) for over, _, _ in PACKED_CASES]

    factors, got, srv = _run(tmp_path, attack)
    for (code, details), (over, want, text) in zip(got, PACKED_CASES):
        assert code == want and text in details, (sorted(over), code, details)
    assert_same_factors(factors, reference)
    assert not srv.app.sessions and not srv.app.by_client
