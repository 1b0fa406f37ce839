"""LoRA factors with their own codecs both ways (training.codec_adapter_up / codec_adapter_down) and error
feedback: the bytes on the wire shrink by exactly what the codec saves, runs still train, the server takes
int8/int4 factors only when the run allows them, clients that lack a codec get raw, and a retried call gets
the same bytes (a residual moves once)."""

from __future__ import annotations

import json
import math
import threading

import grpc
import numpy as np
import pytest
from net_helpers import rpc_status, serving, tiny_cfg
from test_sim_engine import _cfg, _digest, _run

from splitwave.common.manifest import MANIFEST_FILE, BundleManifest
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import decode, encode, encoded_size

C = grpc.StatusCode
EF_ALL = ["up", "down", "adapter_up", "adapter_down"]


def _factor_bytes(manifest, codec: str) -> int:
    return sum(encoded_size("float32", f.shape, codec) for f in manifest.factors)


def _message_bytes(manifest, codec: str, wrap) -> int:
    """Serialized bytes of every factor's frames in `cls` messages (without header): their sizes depend on
    the shapes and the codec only."""
    return sum(
        wrap(f).ByteSize() for s in manifest.factors for f in encode(s.name, np.zeros(s.shape, np.float32), codec)
    )


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("raw"), _cfg(rounds__num_rounds=3))


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_engine_adapters_travel_compressed_both_ways_and_the_run_trains(tmp_path, raw_run, codec):
    """Engine (the real servicer in process, every message metered at its serialized size): PushAdapter and
    AwaitRound shrink by the codec's saving on every factor of every client, and the train loss still falls."""
    cfg = _cfg(
        rounds__num_rounds=3,
        training__codec_up=codec,
        training__codec_down=codec,
        training__codec_adapter_up=codec,
        training__codec_adapter_down=codec,
        training__error_feedback=EF_ALL,
    )
    recs, _, _, res = _run(tmp_path, cfg)
    raw_recs = raw_run[0]
    manifest = BundleManifest.from_json((res.bundle_dir / MANIFEST_FILE).read_text())
    # tiny factors (rank 4: lora_B rows of 4 values, each with its own scale) save less than MiniLM's
    assert _factor_bytes(manifest, codec) < _factor_bytes(manifest, "raw") / 2.5
    for r, base in zip(recs, raw_recs):
        n = len(r["reported"])
        for method, wrap in (
            ("PushAdapter|up", lambda f: pb.AdapterRequest(frame=f)),
            ("AwaitRound|down", lambda f: pb.RoundReply(factor=f)),
        ):
            got = base["bytes_by_method"][method] - r["bytes_by_method"][method]
            # exactly what the factors' frames save: every other field has the same size in both runs
            saved = _message_bytes(manifest, "raw", wrap) - _message_bytes(manifest, codec, wrap)
            assert got == n * saved, (r["round"], method, got, n * saved)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert all(math.isfinite(r["eval_loss"]) for r in recs)


def test_engine_error_feedback_is_deterministic_across_executors(tmp_path):
    """Residuals live with the client (edge) and its session (server): the same run on a worker process."""
    cfg = _cfg(training__codec_up="int4", training__codec_down="int4", training__error_feedback=["up", "down"])
    a = _run(tmp_path, cfg)
    assert _digest(*_run(tmp_path, cfg, workers=1)[:3]) == _digest(*a[:3])


def test_real_edges_push_and_receive_int4_adapters_with_error_feedback(tmp_path):
    """Real EdgeClients over gRPC: int4 factors both ways with error feedback everywhere; what the edges meter
    is what the server meters, the push is int4-sized, and the federation learns."""
    cfg = tiny_cfg(
        training={
            "codec_up": "int8",
            "codec_down": "int8",
            "codec_adapter_up": "int4",
            "codec_adapter_down": "int4",
            "error_feedback": EF_ALL,
        },
        rounds={"num_rounds": 3, "deadline_s": 60},
        num_clients=2,
    )
    with serving(cfg, tmp_path / "run") as srv:
        clients = [EdgeClient(srv.address, ClientOptions(name=f"e{i}", cache_dir=tmp_path / "cache")) for i in (0, 1)]
        errors: list = []

        def go(c):
            try:
                c.run()
            except Exception as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=go, args=(c,)) for c in clients]
        [t.start() for t in threads]
        [t.join(180) for t in threads]
        app = srv.app
        assert not errors, errors
        server_up = sum(n for (c, d, m), n in app.meter.snapshot().items() if d == "up" and m == "PushAdapter")
    assert len(app.rounds.history) == 3 and all(len(r.reported) == 2 for r in app.rounds.history)
    pushes = [h for c in clients for h in c.history if h["kind"] == "push"]
    assert sum(p["bytes_up"] for p in pushes) == server_up
    int4 = _factor_bytes(clients[0].manifest, "int4")
    for p in pushes:  # the int4 content plus a few hundred bytes of names, headers and the end message
        assert int4 < p["bytes_up"] < int4 + 200 * len(clients[0].manifest.factors)
    assert clients[0].joined.config.codec_adapter_up.codec == "int4"
    lines = [json.loads(x) for x in (tmp_path / "run/server_metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval_loss"] < lines[0]["eval_loss"] or lines[-1]["train_loss"] < lines[0]["train_loss"]


@pytest.fixture(scope="module")
def int8_server(tmp_path_factory):
    """A run with int8 factors up, int4 down and error feedback down; two hand-made clients: one that declares
    every codec, one from before int4."""
    cfg = tiny_cfg(
        training={
            "codec_down": "int8",
            "codec_adapter_up": "int8",
            "codec_adapter_down": "int4",
            "error_feedback": ["down", "adapter_down"],
        },
        num_clients=2,
    )
    with serving(cfg, tmp_path_factory.mktemp("run")) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        caps_new = pb.Capabilities(protocol_version=1, backend="custom", codecs=["fp16", "bf16", "int8", "int4"])
        caps_old = pb.Capabilities(protocol_version=1, backend="custom", codecs=["fp16", "bf16", "int8", "topk"])
        new = stub.Join(pb.JoinRequest(client_name="new", capabilities=caps_new), timeout=10)
        old = stub.Join(pb.JoinRequest(client_name="old", capabilities=caps_old), timeout=10)
        yield srv, stub, new, old


def _await(stub, me) -> list:
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=me.current_round)
    return list(stub.AwaitRound(pb.RoundRequest(header=hdr, no_wait=True), timeout=30))


def test_adapter_codecs_are_negotiated_per_client(int8_server):
    """A client without "int4" gets the round's factors raw (and is told so); one with it gets int4, with
    error feedback per client; asking again for the same round gets the same bytes."""
    _, stub, new, old = int8_server
    assert (new.config.codec_adapter_up.codec, new.config.codec_adapter_down.codec) == ("int8", "int4")
    assert (old.config.codec_adapter_up.codec, old.config.codec_adapter_down.codec) == ("int8", "raw")
    assert list(new.config.error_feedback) == ["down", "adapter_down"]
    a_new, a_old = _await(stub, new), _await(stub, old)
    f_new = [r.factor for r in a_new if r.WhichOneof("body") == "factor"]
    f_old = [r.factor for r in a_old if r.WhichOneof("body") == "factor"]
    assert f_new and {f.codec for f in f_new} == {"int4"} and {f.codec for f in f_old} == {"raw"}
    assert [r.SerializeToString() for r in _await(stub, new)] == [r.SerializeToString() for r in a_new]
    got, ref = decode(f_new), decode(f_old)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() <= np.abs(ref[k]).max() / 7 / 2 * (1 + 1e-6) + 1e-12


def _step(me, h, step):
    b, sq = h.shape[:2]
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=0, step=step)
    msgs = [pb.TrainRequest(header=hdr, frame=f) for f in encode("h", h)]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("attention_mask", np.ones((b, sq), np.int64))]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("labels", np.zeros(b, np.int64))]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=b))]


def test_a_retried_step_gets_the_same_gradient_bytes_under_error_feedback(int8_server):
    _, stub, new, _ = int8_server
    hidden = json.loads(new.manifest_json)["hidden_size"]
    h = np.random.default_rng(5).standard_normal((new.config.batch_size, 4, hidden)).astype(np.float32)
    first = [r.SerializeToString() for r in stub.Train(iter(_step(new, h, 0)), timeout=60)]
    again = [r.SerializeToString() for r in stub.Train(iter(_step(new, h, 0)), timeout=60)]
    assert first == again
    grads = [pb.TrainReply.FromString(b).frame for b in first[:-1]]
    assert {f.codec for f in grads} == {"int8"}


def test_factor_uploads_are_refused_in_codecs_the_run_does_not_allow(int8_server):
    """int8 factors pass the codec rule in an int8 run (the push then fails for another reason: no training
    step yet); int4 and topk are refused by name."""
    _, stub, _, old = int8_server
    factors = json.loads(old.manifest_json)["factors"]
    name, shape = factors[0]["name"], factors[0]["shape"]
    hdr = pb.Header(session_token=old.session_token, run_id=old.run_id, round=0, step=3)
    for codec_name, code in (
        ("int8", C.FAILED_PRECONDITION),
        ("int4", C.INVALID_ARGUMENT),
        ("topk", C.INVALID_ARGUMENT),
    ):
        value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        msgs = [pb.AdapterRequest(header=hdr, frame=f) for f in encode(name, value, codec_name, topk_fraction=0.1)]
        msgs.append(pb.AdapterRequest(header=hdr, end=pb.AdapterEnd(num_samples=8, local_steps=3)))
        got, details = rpc_status(lambda: stub.PushAdapter(iter(msgs), timeout=10))
        assert got == code, (codec_name, details)
        if code == C.INVALID_ARGUMENT:
            assert codec_name in details and "'raw', 'fp16', 'bf16', 'int8'" in details
