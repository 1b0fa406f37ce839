"""Hostile peers against a live server with honest edges alongside (issue 12, items 3-5).

Identities (names bound to certificates or to the resume secret of the first Join, slots of clients that never
train freed), bounded resources (silent streams, tiny frames, calls per client) and shutdown/crashes (SIGTERM
answers UNAVAILABLE and the server exits; pushed adapters survive a restart; an abandoned session's server
steps are rolled back before the redo). The honest edges' result must equal an undisturbed run's bit for bit
(sfl-v1 makes a client's result independent of how its steps interleave with others').
"""

from __future__ import annotations

import gc
import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from net_helpers import (
    BASE,
    CAPS,
    ROOT,
    assert_same_factors,
    final_factors,
    free_port,
    make_client,
    rpc_status,
    rss_bytes,
    run_clients,
    serving,
    tiny_cfg,
    wait_until,
)
from test_faults import CRASH_CFG, _edge_proc, _lines, _load_final, crash_reference  # noqa: F401, F811 - fixture
from test_faults import _server_proc as _faults_server
from test_security import pki  # noqa: F401 - the module's certificate fixture

from splitwave.edge.client import EdgeClient
from splitwave.edge.retry import RetryPolicy
from splitwave.edge.security import channel_credentials
from splitwave.launch import CLI, ProcessGroup
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import encode
from splitwave.server.peers import CallGuard, peer_address
from splitwave.server.security import server_credentials

EDGE_CACHE = ROOT / ".cache" / "edge-tests"
C = grpc.StatusCode


def _cfg(limits: dict | None = None, **sections):
    server = dict(sections.pop("server", {}))
    if limits:
        server["limits"] = limits
    return tiny_cfg(num_clients=2, server=server, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two honest edges, nobody else."""
    with serving(_cfg(), tmp_path_factory.mktemp("ref") / "run") as srv:
        res = run_clients(srv.address, ["e0", "e1"], EDGE_CACHE)
        assert all(r["rounds"] == 2 for r in res.values()), res
        return final_factors(srv.app)


def _join(address, name, creds=None, **fields):
    ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with ch:
        return pb_grpc.SplitWaveStub(ch).Join(pb.JoinRequest(client_name=name, capabilities=CAPS, **fields), timeout=10)


class _Runner:
    """Honest edges in background threads while a test attacks."""

    def __init__(self, address, names, **opts):
        self.out: dict = {}
        self.thread = threading.Thread(
            target=lambda: self.out.update(run_clients(address, names, EDGE_CACHE, **opts)), daemon=True
        )
        self.thread.start()

    def result(self, timeout=180):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "honest edges did not finish"
        return self.out


# -- identities ------------------------------------------------------------------------------------------


def test_name_theft_refused_without_and_with_enrollment_secret(tmp_path, reference):
    """A stranger, and an insider who knows the enrollment secret, join under a live client's name: refused
    unless they have that client's resume secret; the honest edge trains on undisturbed."""
    cfg = _cfg(server={"security": {"enrollment_secret": "club"}})
    with serving(cfg, tmp_path / "run") as srv:
        honest = _Runner(srv.address, ["e0", "e1"], enrollment_secret="club")
        wait_until(lambda: "e0" in srv.app.by_client, 60, "e0 to join")
        token = srv.app.by_client["e0"].token
        # a stranger without the enrollment secret
        assert rpc_status(_join, srv.address, "e0")[0] == C.UNAUTHENTICATED
        # an insider: right enrollment secret, no / a guessed resume secret
        code, details = rpc_status(_join, srv.address, "e0", enrollment_secret="club")
        assert code == C.PERMISSION_DENIED and "resume secret" in details, details
        code, details = rpc_status(_join, srv.address, "e0", enrollment_secret="club", resume_secret="guess")
        assert code == C.PERMISSION_DENIED and "resume secret" in details, details
        assert srv.app.by_client["e0"].token == token  # the honest session is untouched
        res = honest.result()
    assert all(r["rounds"] == 2 for r in res.values()), res
    assert_same_factors(final_factors(srv.app), reference)


def test_resume_secret_rejoins_and_survives_a_restart(tmp_path):
    """The secret of the first Join gets the name back, also from a server restarted from its checkpoint
    (only its hash is stored)."""
    ckpt = tmp_path / "ckpt"
    cfg = _cfg(server={"checkpoint_dir": str(ckpt)})
    with serving(cfg, tmp_path / "run") as srv:
        first = _join(srv.address, "e0")
        assert len(first.resume_secret) >= 40 and first.limits.min_frame_bytes == cfg.server.limits.min_frame_bytes
        assert first.limits.max_frame_bytes > 0 and first.limits.max_message_bytes > first.limits.max_frame_bytes
        again = _join(srv.address, "e0", resume_secret=first.resume_secret)
        assert again.client_id == "e0" and again.session_token != first.session_token
        assert again.resume_secret == first.resume_secret  # not rotated: a lost reply can be retried
    registry = (ckpt / "registry.json").read_text()
    assert first.resume_secret not in registry and json.loads(registry)["clients"]["e0"]["resume_sha256"]
    with serving(cfg, tmp_path / "run") as srv:
        assert rpc_status(_join, srv.address, "e0")[0] == C.PERMISSION_DENIED
        assert _join(srv.address, "e0", resume_secret=first.resume_secret).client_id == "e0"


def test_mtls_certificate_cannot_claim_another_name(tmp_path, pki):  # noqa: F811
    """A certificate named e1 claims the name e0 before e0 has joined: refused; e0 then trains normally."""
    sec = {
        "insecure": False,
        "server_cert": pki["server_cert"],
        "server_key": pki["server_key"],
        "client_ca": pki["ca"],
    }
    cfg = tiny_cfg(num_clients=1, server={"security": sec})
    with serving(cfg, tmp_path / "run", credentials=server_credentials(cfg.server.security)) as srv:
        mallory = channel_credentials(pki["ca"], pki["e1_cert"], pki["e1_key"])
        code, details = rpc_status(_join, srv.address, "e0", creds=mallory)
        assert code == C.PERMISSION_DENIED and "certificate" in details, details
        assert not srv.app.by_client
        e0 = channel_credentials(pki["ca"], pki["e0_cert"], pki["e0_key"])
        res = run_clients(srv.address, ["e0"], EDGE_CACHE, credentials=e0)
        assert res["e0"]["rounds"] == 2, res


def test_strangers_holding_every_slot_do_not_lock_out_honest_edges(tmp_path, reference):
    """Two strangers take both slots of a 2-client run and never train: their slots are freed after
    limits.unused_slot_s, the honest edges (retrying on UNAVAILABLE) get in and train as if alone."""
    cfg = _cfg(limits={"unused_slot_s": 1.0})
    with serving(cfg, tmp_path / "run") as srv:
        strangers = [_join(srv.address, n) for n in ("s1", "s2")]
        wait_until(lambda: srv.app.rounds.is_open, 10, "round 0 to open with the strangers")
        code, details = rpc_status(_join, srv.address, "e9")
        assert code == C.UNAVAILABLE and "retry" in details, (code, details)  # not yet: the edges retry
        res = run_clients(srv.address, ["e0", "e1"], EDGE_CACHE)
        assert all(r["rounds"] == 2 for r in res.values()), res
        for j in strangers:  # their sessions are gone
            req = pb.RoundRequest(header=pb.Header(session_token=j.session_token, run_id=j.run_id), no_wait=True)
            with grpc.insecure_channel(srv.address) as ch:
                assert (
                    rpc_status(lambda: list(pb_grpc.SplitWaveStub(ch).AwaitRound(req, timeout=5)))[0]
                    == C.UNAUTHENTICATED
                )
        assert_same_factors(final_factors(srv.app), reference)


# -- bounded resources -----------------------------------------------------------------------------------


class SilentStreams:
    """`n` token-less Train streams that send nothing; each one closed by the server is reopened."""

    def __init__(self, address: str, n: int, reopen_delay_s: float = 0.05):
        self.ch = grpc.insecure_channel(address)
        self.stub = pb_grpc.SplitWaveStub(self.ch)
        self.stop = threading.Event()
        self.ended: dict[str, int] = {}
        self._lock = threading.Lock()
        self.delay = reopen_delay_s
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _hold(self):
        while not self.stop.is_set():
            q: queue.Queue = queue.Queue()
            call = self.stub.Train(iter(q.get, None))
            try:
                for _ in call:
                    pass
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            finally:
                q.put(None)
            with self._lock:
                self.ended[code] = self.ended.get(code, 0) + 1
            self.stop.wait(self.delay)

    def close(self):
        self.stop.set()
        for t in self.threads:  # each ends when the server closes its current stream
            t.join(30)
        self.ch.close()


def test_silent_streams_do_not_starve_training_or_health(tmp_path, reference):
    """32 token-less Train streams that send nothing, reopened when closed: honest training and the health
    check go on, the streams are closed (first-message timeout / pending limits), RSS stays bounded."""
    cfg = _cfg(limits={"first_message_timeout_s": 1.0})
    with serving(cfg, tmp_path / "run") as srv:
        gc.collect()
        rss0 = rss_bytes()
        attack = SilentStreams(srv.address, 32)
        health, stop = [], threading.Event()

        def probe():
            with grpc.insecure_channel(srv.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while not stop.is_set():
                    try:
                        r = stub.Check(health_pb2.HealthCheckRequest(service="splitwave.v1.SplitWave"), timeout=5)
                        health.append(r.status == health_pb2.HealthCheckResponse.SERVING)
                    except grpc.RpcError as e:
                        health.append(e.code().name)
                    stop.wait(0.2)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            time.sleep(1.0)  # the attack is in full swing before the honest edges come
            res = run_clients(srv.address, ["e0", "e1"], EDGE_CACHE)
            pending = srv.servicer.guard.open_calls().get("pending", 0)
        finally:
            stop.set()
            prober.join(10)
            attack.close()
        gc.collect()
        rss1 = rss_bytes()
        closed = dict(srv.servicer.guard.closed)
        print(
            f"silent streams: closed by the server {closed}, seen by the attacker {attack.ended}, health "
            f"{sum(h is True for h in health)}/{len(health)} SERVING, "
            f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB"
        )
        assert all(r["rounds"] == 2 for r in res.values()), res
        assert health and all(h is True for h in health), health
        assert sum(closed.values()) >= 32 and attack.ended.get("CANCELLED", 0) >= 32
        assert pending <= cfg.server.limits.max_pending_calls + cfg.num_clients
        assert rss1 - rss0 < 256 << 20
        assert_same_factors(final_factors(srv.app), reference)
    wait_until(lambda: srv.servicer.guard.open_calls() == {}, 10, "every call to end")


def _step_msgs(j, h, step=0, frames=None):
    hdr = pb.Header(session_token=j.session_token, run_id=j.run_id, round=0, step=step)
    msgs = [pb.TrainRequest(header=hdr, frame=f) for f in (frames if frames is not None else encode("h", h))]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("attention_mask", np.ones(h.shape[:2], np.int64))]
    msgs += [pb.TrainRequest(header=hdr, frame=f) for f in encode("labels", np.zeros(h.shape[0], np.int64))]
    return msgs + [pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=h.shape[0]))]


def test_silent_streams_are_closed_after_their_timeouts(tmp_path):
    """A stream that never sends its first message is closed after first_message_timeout_s; an authenticated
    one that stops sending after a step, after stream_idle_timeout_s."""
    cfg = tiny_cfg(num_clients=1, server={"limits": {"first_message_timeout_s": 0.5, "stream_idle_timeout_s": 1.0}})
    with serving(cfg, tmp_path / "run") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        q: queue.Queue = queue.Queue()
        code, _ = rpc_status(lambda: list(stub.Train(iter(q.get, None), timeout=60)))
        q.put(None)
        assert code == C.CANCELLED and srv.servicer.guard.closed["first_message_timeout"] == 1
        j = stub.Join(pb.JoinRequest(client_name="e0", capabilities=CAPS), timeout=10)
        wait_until(lambda: srv.app.rounds.is_open, 10, "round 0")
        q = queue.Queue()
        for m in _step_msgs(j, np.zeros((8, 16, 32), np.float32)):
            q.put(m)
        replies = stub.Train(iter(q.get, None), timeout=60)
        assert any(r.WhichOneof("body") == "end_step" for r in replies)  # answered; now the client goes silent
        code, _ = rpc_status(lambda: list(replies))
        q.put(None)
        assert code == C.CANCELLED and srv.servicer.guard.closed["idle_timeout"] == 1
        wait_until(lambda: srv.servicer.active["Train"] == 0, 10, "the streams' threads to be free")


def test_tiny_frames_refused_at_the_first(tmp_path):
    """h sent as one-byte frames (legal to the codec): refused at the first frame, before the rest is read."""
    # the held-back frame stream keeps the first call open up to 10 s: round 0 must outlive it for the honest step
    cfg = tiny_cfg(num_clients=1, rounds={"num_rounds": 2, "deadline_s": 120})
    with serving(cfg, tmp_path / "run") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        j = stub.Join(pb.JoinRequest(client_name="e0", capabilities=CAPS), timeout=10)
        wait_until(lambda: srv.app.rounds.is_open, 10, "round 0")
        h = np.zeros((8, 16, 32), np.float32)
        raw = h.tobytes()
        sent, released = [], threading.Event()

        def frames():
            for i in range(len(raw)):
                if i == 1:  # the answer must come before the client sends more than the first frame
                    released.wait(10)
                    return
                sent.append(i)
                yield pb.TensorFrame(
                    name="h",
                    dtype="float32",
                    shape=list(h.shape),
                    codec="raw",
                    frame_index=i,
                    frame_count=len(raw),
                    payload=raw[i : i + 1],
                )

        code, details = rpc_status(lambda: list(stub.Train((m for m in _step_msgs(j, h, frames=frames())), timeout=30)))
        released.set()
        assert code == C.INVALID_ARGUMENT and "at least" in details, details
        assert sent == [0]
        # an honest step still goes through on the same session
        code, details = rpc_status(lambda: list(stub.Train(iter(_step_msgs(j, h)), timeout=30)))
        assert code == C.OK, details


def test_calls_per_client_are_bounded(tmp_path):
    """One client may hold max_calls_per_client calls at once; more are refused, other clients unaffected."""
    cfg = tiny_cfg(num_clients=2, server={"limits": {"max_calls_per_client": 2}})
    with serving(cfg, tmp_path / "run") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        j = stub.Join(pb.JoinRequest(client_name="e0", capabilities=CAPS), timeout=10)
        hdr = pb.Header(session_token=j.session_token, run_id=j.run_id)
        msg = pb.TrainRequest(header=hdr, frame=encode("h", np.zeros((8, 16, 32), np.float32))[0])
        calls = []
        for i in range(3):  # streams that show the token and then hold
            q: queue.Queue = queue.Queue()
            q.put(msg)
            calls.append((q, stub.Train(iter(q.get, None), timeout=30)))
            wait_until(
                lambda: (
                    srv.servicer.guard.open_calls().get("client:e0", 0) == min(i + 1, 2)
                    and (i < 2 or calls[-1][1].done())
                ),
                10,
                f"call {i} to be counted",
            )
        assert calls[2][1].code() == C.RESOURCE_EXHAUSTED, calls[2][1].details()
        for q, c in calls[:2]:
            q.put(None)
            assert rpc_status(lambda c=c: list(c))[0] == C.INVALID_ARGUMENT  # ended inside a step
        assert _join(srv.address, "e1").client_id == "e1"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 4), st.integers(1, 8))
def test_guard_bounds_pending_calls_per_peer_and_in_all(peers, per_peer, total):
    """Whatever order calls from which peers open in, the silent ones never exceed the limits; the newest
    always gets in (the oldest is closed)."""
    from splitwave.common.config import LimitsConfig

    class Ctx:
        def __init__(self, peer):
            self._peer, self.cancelled = peer, False

        def peer(self):
            return self._peer

        def cancel(self):
            self.cancelled = True

    guard = CallGuard(
        LimitsConfig(max_pending_per_peer=per_peer, max_pending_calls=total, first_message_timeout_s=3600),
        num_clients=0,
        tick_s=3600,
    )
    try:
        open_ = []
        for p in peers:
            ctx = Ctx(f"ipv4:10.0.0.{p}:{len(open_) + 1000}")
            cm = guard.call(ctx, "Train", stream=True)
            cm.__enter__()
            open_.append((p, ctx, cm))  # keeps the call open (a dropped context manager would end it)
            live = [(q, c) for q, c, _ in open_ if not c.cancelled]
            assert not ctx.cancelled
            assert len(live) <= total
            assert all(sum(1 for q, _ in live if q == x) <= per_peer for x in set(peers))
    finally:
        guard.stop()


def test_peer_address():
    assert peer_address("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address("unix:/tmp/x") == "unix:/tmp/x"


# -- shutdown and crashes --------------------------------------------------------------------------------


def _server_proc(procs: ProcessGroup, cfg: dict, tmp_path: Path, port: int) -> subprocess.Popen:
    """A serving `splitwave server --config CFG` (the deprecated spelling) on `port`, child "server" of `procs`."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ready = tmp_path / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [*CLI, "server", "--config", str(cfg_path), "--port", str(port), "--run-dir", str(tmp_path / "run")]
    argv += ["--ready-file", str(ready), "--cache-dir", str(ROOT / ".cache" / "bundles")]
    argv += ["--set", f"server.checkpoint_dir={tmp_path / 'ckpt'}"]
    p = procs.start("server", argv, tmp_path / "server.log", append=True)
    procs.wait_ready("server", ready, 120)
    return p


def test_sigterm_answers_waiting_clients_unavailable_and_exits(tmp_path):
    """SIGTERM while a registered client waits for a round: its call ends UNAVAILABLE (retry, not stop) and
    the server process exits although the client never left."""
    port = free_port()
    cfg = {**BASE, "num_clients": 2, "rounds": {"num_rounds": 2, "deadline_s": 120}}
    with ProcessGroup(cwd=ROOT) as procs:
        server = _server_proc(procs, cfg, tmp_path, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.SplitWaveStub(ch)
            j = stub.Join(pb.JoinRequest(client_name="e0", capabilities=CAPS), timeout=10)
            out = {}

            def wait_round():
                req = pb.RoundRequest(header=pb.Header(session_token=j.session_token, run_id=j.run_id))
                out["code"] = rpc_status(lambda: list(stub.AwaitRound(req, timeout=60)))

            t = threading.Thread(target=wait_round)
            t.start()
            time.sleep(1.0)  # the call is parked in the server
            server.send_signal(signal.SIGTERM)
            t.join(30)
            assert out["code"][0] == C.UNAVAILABLE, out
        assert server.wait(30) == 0


def test_pushed_adapter_survives_a_restart(tmp_path):
    """An adapter pushed to a round that had not closed when the server went down counts after the restart:
    that client is not asked to redo the round."""
    ckpt = tmp_path / "ckpt"
    cfg = _cfg(server={"checkpoint_dir": str(ckpt)}, rounds={"num_rounds": 2, "deadline_s": 120})
    srv_cm = serving(cfg, tmp_path / "run")
    srv = srv_cm.__enter__()
    try:
        idle = _join(srv.address, "e1")  # selected, never trains: round 0 stays open
        c = make_client(srv.address, "e0", EDGE_CACHE, retry=RetryPolicy(connect_s=0.0, total_s=0.0))
        t = threading.Thread(target=lambda: rpc_status(c.run), daemon=True)
        t.start()
        wait_until(lambda: "e0" in srv.app.rounds.reports, 60, "e0 to push round 0")
        pushed = {k: np.array(v) for k, v in srv.app.rounds.reports["e0"].factors.items()}
        top = srv.app.trainer.factors("e0")
    finally:
        srv_cm.__exit__(None, None, None)
    c.close()
    t.join(30)
    assert list((ckpt / "pending").glob("r000000-e0.pt"))
    from splitwave.server.app import SplitServer

    app = SplitServer(cfg, tmp_path / "run2", cache_dir=ROOT / ".cache" / "bundles")
    try:
        wait_until(lambda: app.rounds.is_open, 10, "round 0 to reopen")
        assert app.rounds.round_idx == 0 and sorted(app.rounds.reports) == ["e0"]
        for k, v in pushed.items():
            np.testing.assert_array_equal(app.rounds.reports["e0"].factors[k], v)
        for k, v in top.items():  # sfl-v1: the top adapter slot as it was at the push
            np.testing.assert_array_equal(app.trainer.factors("e0")[k], v)
        assert app.rounds.selected_since("e0") is None and app.rounds.selected_since("e1") is not None
        assert app.by_client["e1"].resume_digest  # e1 can come back with its secret
        assert idle.resume_secret
    finally:
        app.shutdown()


class _DiesMidRound(EdgeClient):
    """An edge that dies (no Leave, stream dropped) after `after` steps of round 0."""

    after = 2

    def _record(self, rec):
        super()._record(rec)
        if rec.get("kind") == "step" and rec["round"] == 0 and rec["step"] == self.after:
            raise SystemExit("killed")


class _Rejoins(EdgeClient):
    """A restarted edge that presents the resume secret of its earlier Join."""

    secret = ""

    def join(self):
        real = self.stub.Join

        def with_secret(req, **kw):
            req.resume_secret = self.secret
            return real(req, **kw)

        self.stub.Join = with_secret
        return super().join()


@pytest.mark.parametrize("mode", ["sfl-v1", "sfl-v2"])
def test_abandoned_steps_rolled_back_before_the_redo(tmp_path, reference, mode):
    """An edge dies after 3 steps of round 0 and rejoins (with its resume secret) while the round is open:
    its 3 abandoned server steps are undone before it redoes the round. The server's step count is what an
    undisturbed run takes; in sfl-v1 the result is bit-identical to it."""
    cfg = _cfg(training={"mode": mode}, rounds={"num_rounds": 2, "deadline_s": 120})
    local = cfg.training.local_steps
    with serving(cfg, tmp_path / "run") as srv:
        honest = _Runner(srv.address, ["e1"])
        victim = make_client(srv.address, "e0", EDGE_CACHE, cls=_DiesMidRound)
        try:
            with pytest.raises(SystemExit):
                victim.run()
        finally:
            victim.close()
        assert srv.app.by_client["e0"].round_steps == {0: _DiesMidRound.after + 1}
        again = make_client(srv.address, "e0", EDGE_CACHE, cls=_Rejoins)
        again.secret = victim.joined.resume_secret
        try:
            summary = again.run()
        finally:
            again.close()
        res = honest.result()
        assert summary["rounds"] == 2 and res["e1"]["rounds"] == 2, (summary, res)
        steps = {c: srv.app.trainer.optimizer_steps(c if mode == "sfl-v1" else None) for c in ("e0", "e1")}
    if mode == "sfl-v1":
        assert steps == {"e0": 2 * local, "e1": 2 * local}, steps
        assert_same_factors(final_factors(srv.app), reference)
    else:
        assert steps["e0"] == 2 * 2 * local, steps  # the shared adapter's steps: both clients, both rounds


def test_sigterm_after_a_push_then_restart_gives_the_same_adapters(tmp_path, crash_reference):
    """SIGTERM while e0 waits for the next round after pushing and e1 still trains: the server exits, the
    edges ride out the restart (UNAVAILABLE, retried), e0's adapter is not lost, e1 redoes its round; the
    final adapters equal an undisturbed run's."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CRASH_CFG))
    port, run_dir, ckpt, ready = free_port(), tmp_path / "run", tmp_path / "ckpt", tmp_path / "ready.json"
    slog = tmp_path / "server.log"
    with ProcessGroup(cwd=ROOT) as procs:
        server = _faults_server(procs, cfg_path, port, run_dir, ckpt, ready, slog)
        procs.wait_ready("server", ready, 120)
        ems = [tmp_path / f"e{i}.jsonl" for i in range(2)]
        edges = [_edge_proc(procs, f"127.0.0.1:{port}", f"e{i}", ems[i], tmp_path / f"e{i}.log") for i in range(2)]
        wait_until(lambda: any(r.get("kind") == "push" and r["round"] == 2 for r in _lines(ems[0])), 120, "e0's push")
        pushed = [p.name for p in (ckpt / "pending").glob("r000002-*.pt")]
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, slog.read_text()[-3000:]
        ready.unlink()
        server = _faults_server(procs, cfg_path, port, run_dir, ckpt, ready, slog)
        for i, e in enumerate(edges):
            assert e.wait(180) == 0, (tmp_path / f"e{i}.log").read_text()[-3000:]
        assert server.wait(60) == 0
    log = slog.read_text()
    assert "resumed run" in log, log[-3000:]
    lines = _lines(run_dir / "server_metrics.jsonl")
    assert [r["round"] for r in lines] == list(range(5))
    e0_rounds = [r["round"] for r in _lines(tmp_path / "e0.jsonl") if r.get("kind") == "push"]
    assert e0_rounds.count(2) == 1, e0_rounds  # its push counted: it was not asked to redo round 2
    print(f"pending at SIGTERM: {pushed}")
    assert_same_factors(_load_final(run_dir), crash_reference, atol=1e-6)
