"""The channel-aware codec policy over real gRPC on loopback: an edge switches h's codec and the grad_h codec it
asks for (StepEnd.codec_down) as its rate estimates change, and the server honours the request; a codec_down
outside the run's ladder is INVALID_ARGUMENT, refused before the step is trained."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from net_helpers import EDGE_CACHE, make_client, rpc_status, serving, tiny_cfg

from splitwave.edge.client import EdgeClient
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import encode

POLICY = {"kind": "channel_aware", "ladder": ["raw", "fp16", "int8"], "budget_s": 0.05}
FAST, SLOW = 1e9, 1e3  # bytes/s: raw fits the 50 ms budget / nothing fits (the coarsest, int8)


class Scripted:
    """A rate estimator whose estimate before the n-th observed step is script[n] (NaN at the start: none)."""

    def __init__(self, script):
        self.script, self.n = list(script), 0

    def observe(self, nbytes, seconds):
        assert nbytes > 0 and (seconds is None or math.isfinite(seconds))
        self.n += 1

    @property
    def rate(self):
        return self.script[self.n] if self.n < len(self.script) else math.nan


UP = [math.nan, FAST, SLOW, SLOW, FAST, SLOW]  # 2 rounds of 3 steps
DOWN = [SLOW, SLOW, FAST, FAST, SLOW, FAST]


def test_edge_switches_codecs_as_its_link_rates_change(tmp_path):
    class Edge(EdgeClient):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.rate_up, self.rate_down = Scripted(UP), Scripted(DOWN)

    cfg = tiny_cfg(training={"codec_policy": POLICY})
    with serving(cfg, tmp_path / "run") as srv:
        c = make_client(srv.address, "edge-0", EDGE_CACHE, cls=Edge)
        try:
            summary = c.run()
        finally:
            c.close()
        assert summary["rounds"] == 2
    steps = [r for r in c.history if r["kind"] == "step"]
    assert len(steps) == 6
    # no estimate (NaN) and FAST: raw; SLOW: nothing fits, int8
    assert [s["codec_up"] for s in steps] == ["raw", "raw", "int8", "int8", "raw", "int8"]
    # grad_h came back in the codec each step asked for
    assert [s["codec_down"] for s in steps] == ["int8", "int8", "raw", "raw", "int8", "raw"]
    assert steps[0]["rate_up_Bps"] is None and steps[1]["rate_up_Bps"] == FAST
    # every step was measured: the estimators were fed once per step
    assert c.rate_up.n == 6 and c.rate_down.n == 6


def test_edge_measures_its_rates_from_its_steps(tmp_path):
    """Without a policy the edge still measures each step (the estimates are finite and positive) and keeps the
    run's fixed codecs."""
    cfg = tiny_cfg(training={"codec_down": "fp16"})
    with serving(cfg, tmp_path / "run") as srv:
        c = make_client(srv.address, "edge-0", EDGE_CACHE)
        try:
            c.run()
        finally:
            c.close()
    steps = [r for r in c.history if r["kind"] == "step"]
    assert {s["codec_up"] for s in steps} == {"raw"} and {s["codec_down"] for s in steps} == {"fp16"}
    assert c.rate_down.samples > 0 and c.rate_down.rate > 0
    assert c.rate_up.samples > 0 and c.rate_up.rate > 0  # tiny steps: buffers, so only a rough figure


def _step(me, hidden, step, codec_down):
    b, sq = me.config.batch_size, 4
    h = np.random.default_rng(step).standard_normal((b, sq, hidden)).astype(np.float32)
    hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=0, step=step)
    msgs = [pb.TrainRequest(header=hdr, frame=f) for f in encode("h", h)]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("attention_mask", np.ones((b, sq), np.int64))]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("labels", np.zeros(b, np.int64))]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=b, codec_down=codec_down))]


@pytest.mark.parametrize("policy", [POLICY, None], ids=["channel-aware", "fixed"])
def test_server_honours_codec_down_from_the_ladder_only(tmp_path, policy):
    cfg = tiny_cfg(training={"codec_policy": policy} if policy else {})
    with serving(cfg, tmp_path / "run") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        caps = pb.Capabilities(protocol_version=1, backend="custom", codecs=["raw", "fp16", "int8", "bf16"])
        me = stub.Join(pb.JoinRequest(client_name="custom", capabilities=caps), timeout=10)
        assert (me.config.codec_policy.kind or "fixed") == ("channel_aware" if policy else "fixed")
        hdr = pb.Header(session_token=me.session_token, run_id=me.run_id, round=me.current_round)
        list(stub.AwaitRound(pb.RoundRequest(header=hdr, no_wait=True), timeout=30))
        hidden = json.loads(me.manifest_json)["hidden_size"]

        code, details = rpc_status(lambda: list(stub.Train(iter(_step(me, hidden, 0, "bf16")), timeout=30)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "StepEnd.codec_down 'bf16'" in details and "['raw'" in details
        if not policy:
            assert "does not steer the downlink" in details
        # refused before training: step 0 is still free
        want = "int8" if policy else "raw"
        replies = list(stub.Train(iter(_step(me, hidden, 0, want)), timeout=30))
        assert {r.frame.codec for r in replies if r.WhichOneof("body") == "frame"} == {want}
        replies = list(stub.Train(iter(_step(me, hidden, 1, "")), timeout=30))  # empty: the run's codec_down
        assert {r.frame.codec for r in replies if r.WhichOneof("body") == "frame"} == {"raw"}


@pytest.mark.slow  # real time through a shaping proxy: timing-dependent, ~20 s
@pytest.mark.parametrize("up_mbps, down_mbps", [(4, 40), (40, 4)])
def test_edge_estimates_track_a_shaped_link(tmp_path, up_mbps, down_mbps):
    """Behind a ShapingProxy with static links the edge's estimates come within a few tens of percent of the
    link rates, erring low (the policy steers the downlink, so grad_h comes in 64 KiB frames the edge times)."""
    from splitwave.channel import ShapingProxy, StaticLink

    policy = {"kind": "channel_aware", "ladder": ["raw", "fp16"], "budget_s": 100.0}
    cfg = tiny_cfg(
        training={"local_steps": 4, "batch_size": 32, "codec_policy": policy},
        data={"max_seq_len": 64, "num_train": 256},
    )
    up, down = StaticLink(up_mbps * 1e6, 0.01), StaticLink(down_mbps * 1e6, 0.01)
    with serving(cfg, tmp_path / "run") as srv:
        host, port = srv.address.rsplit(":", 1)
        with ShapingProxy("127.0.0.1", 0, (host, int(port)), up, down) as px:
            c = make_client(f"127.0.0.1:{px.port}", "edge-0", EDGE_CACHE)
            try:
                c.run()
            finally:
                c.close()
    steps = [r for r in c.history if r["kind"] == "step"]
    assert {s["codec_up"] for s in steps} == {"raw"} and min(s["bytes_up"] for s in steps) > 100_000
    assert 0.5 < c.rate_up.rate / (up_mbps * 1e6 / 8) < 1.05
    assert 0.5 < c.rate_down.rate / (down_mbps * 1e6 / 8) < 1.05
