"""Faults: a flaky link, an edge killed mid-round, a server killed mid-run and resumed from its checkpoint.

The flaky link and the server crash must not change the result: the final adapters equal those of an
undisturbed run with the same seeds.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from net_helpers import (
    BASE,
    ROOT,
    assert_same_factors,
    final_factors,
    free_port,
    make_client,
    run_clients,
    serving,
    tiny_cfg,
    wait_until,
)

from splitwave.launch import ProcessGroup

EDGE_CACHE = ROOT / ".cache" / "edge-tests"


# -- a TCP proxy that resets the connection once -----------------------------------------------------------


class ResettingProxy:
    """Forwards 127.0.0.1:port -> upstream; after `reset_after` client->server bytes it resets (RST) every
    open connection, once. gRPC multiplexes all calls on one connection, so an open Train stream breaks."""

    def __init__(self, upstream: int, reset_after: int):
        self.upstream, self.reset_after = upstream, reset_after
        self.sent = 0
        self.resets = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._lsock = socket.socket()
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen()
        self.port = self._lsock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src, dst, upstream):
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        self.sent += len(data)
                        trip = self.resets == 0 and self.sent >= self.reset_after
                        if trip:
                            self.resets += 1
                    if trip:
                        self._reset_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _reset_all(self):
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                s.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self._lsock.close()
        self._reset_all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two honest clients, no faults."""
    cfg = tiny_cfg(num_clients=2)
    with serving(cfg, tmp_path_factory.mktemp("ref") / "run") as srv:
        res = run_clients(srv.address, ["e0", "e1"], EDGE_CACHE)
        assert all(r["rounds"] == 2 for r in res.values()), res
        return final_factors(srv.app)


@pytest.mark.parametrize("reset_after", [30_000, 60_000, 95_000])
def test_connection_reset_mid_train_is_retried_exactly_once(tmp_path, reference, reset_after):
    cfg = tiny_cfg(num_clients=2)
    with serving(cfg, tmp_path / "run") as srv:
        proxy = ResettingProxy(srv.port, reset_after)
        out = {}

        def flaky():
            c = make_client(f"127.0.0.1:{proxy.port}", "e0", EDGE_CACHE)
            try:
                out["e0"] = c.run()
                out["steps"] = [(r["round"], r["step"]) for r in c.history if r["kind"] == "step"]
            finally:
                c.close()

        t = threading.Thread(target=flaky)
        t.start()
        run_clients(srv.address, ["e1"], EDGE_CACHE)
        t.join(120)
        proxy.close()
        assert proxy.resets == 1, f"the proxy never tripped ({proxy.sent} bytes)"
        assert out["e0"]["rounds"] == 2
        assert out["steps"] == [(r, s) for r in range(2) for s in range(3)]  # no step lost or doubled
        assert_same_factors(final_factors(srv.app), reference)


# -- an edge process killed mid-round ----------------------------------------------------------------------


def _edge_proc(procs: ProcessGroup, address: str, name: str, metrics: Path, log: Path) -> subprocess.Popen:
    """`splitwave -q edge` NAME as a child of `procs`; a restart of NAME goes on in the same log."""
    return procs.start_edge(
        name, address, cache_dir=EDGE_CACHE, metrics=metrics, log=log, extra=["--threads", "1"], quiet=True, append=True
    )


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def test_edge_killed_mid_round_rejoins_next_round(tmp_path):
    cfg = tiny_cfg(num_clients=2, training={"local_steps": 40}, rounds={"num_rounds": 4, "deadline_s": 6})
    with serving(cfg, tmp_path / "run") as srv, ProcessGroup(cwd=ROOT) as procs:
        app, metrics_path = srv.app, tmp_path / "run" / "server_metrics.jsonl"
        vm = tmp_path / "victim.jsonl"
        victim = _edge_proc(procs, srv.address, "victim", vm, tmp_path / "victim.log")
        steady = _edge_proc(procs, srv.address, "steady", tmp_path / "steady.jsonl", tmp_path / "steady.log")
        # kill the victim in the middle of round 1's local steps
        wait_until(
            lambda: any(r.get("kind") == "step" and r["round"] == 1 and r["step"] >= 3 for r in _lines(vm)),
            90,
            "the victim to train in round 1",
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_until(lambda: any(r["round"] == 1 for r in _lines(metrics_path)), 30, "round 1 to close")
        r1 = next(r for r in _lines(metrics_path) if r["round"] == 1)
        assert r1["late"] == ["victim"] and r1["reported"] == ["steady"]
        # the dead client's Train stream is gone from the server; its session waits for a rejoin
        wait_until(lambda: srv.servicer.active["Train"] <= 1, 10, "the dead stream to be cleaned up")
        old_token = app.by_client["victim"].token
        victim = _edge_proc(procs, srv.address, "victim", vm, tmp_path / "victim.log")
        for p in (victim, steady):
            assert p.wait(120) == 0
        rounds = {r["round"]: r for r in _lines(metrics_path)}
        assert sorted(rounds) == [0, 1, 2, 3]
        assert "victim" in rounds[3]["reported"]  # back in the run
        assert not app.sessions and not app.by_client and old_token not in app.sessions
        assert sum(srv.servicer.active.values()) == 0  # every stream was closed
        # same name, same shard: the restarted edge trained on the data it had before
        steps = [r for r in _lines(vm) if r.get("kind") == "step"]
        assert steps and all(r["client"] == "victim" for r in steps)


# -- the server killed mid-run and resumed from its checkpoint ---------------------------------------------

CRASH_CFG = {
    **BASE,
    "num_clients": 2,
    "rounds": {"num_rounds": 5, "deadline_s": 60},
    "training": {**BASE["training"], "local_steps": 6},
}


def _server_proc(
    procs: ProcessGroup, cfg_path: Path, port: int, run_dir: Path, ckpt: Path, ready: Path, log: Path
) -> subprocess.Popen:
    """`splitwave server` on `port`, checkpointing to `ckpt`, as child "server" of `procs`; a restart goes on in
    the same log."""
    return procs.start_server(
        cfg_path,
        run_dir=run_dir,
        cache_dir=ROOT / ".cache" / "bundles",
        ready_file=ready,
        log=log,
        extra=["--port", str(port), "--set", f"server.checkpoint_dir={ckpt}"],
        append=True,
    )


@pytest.fixture(scope="module")
def crash_reference(tmp_path_factory):
    from splitwave.common.config import parse_config

    with serving(parse_config(CRASH_CFG), tmp_path_factory.mktemp("crashref") / "run") as srv:
        res = run_clients(srv.address, ["e0", "e1"], EDGE_CACHE)
        assert all(r["rounds"] == 5 for r in res.values()), res
        return final_factors(srv.app)


def _load_final(run_dir: Path) -> dict:
    out = {}
    for kind, f in (("edge", "edge_factors.npz"), ("top", "top_factors.npz")):
        with np.load(run_dir / "final" / f) as z:
            out.update({f"{kind}/{k}": z[k] for k in z.files})
    return out


def _forget_tokens(ckpt: Path) -> None:
    """Make the restarted server refuse the old session tokens (UNAUTHENTICATED), as a server that does not keep
    tokens across restarts does: the edges must rejoin by themselves."""
    reg = ckpt / "registry.json"
    raw = json.loads(reg.read_text())
    for cid, c in raw.get("clients", {}).items():
        if "token_sha256" in c:
            c["token_sha256"] = hashlib.sha256(f"forgotten {cid}".encode()).hexdigest()
    reg.write_text(json.dumps(raw))


@pytest.mark.parametrize("kill_at", ["train", "await", "train-tokens-lost"])
def test_server_killed_and_resumed_gives_the_same_adapters(tmp_path, crash_reference, kill_at):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CRASH_CFG))
    port, run_dir, ckpt, ready = free_port(), tmp_path / "run", tmp_path / "ckpt", tmp_path / "ready.json"
    slog = tmp_path / "server.log"
    with ProcessGroup(cwd=ROOT) as procs:
        server = _server_proc(procs, cfg_path, port, run_dir, ckpt, ready, slog)
        procs.wait_ready("server", ready, 120)
        ems = [tmp_path / f"e{i}.jsonl" for i in range(2)]
        edges = [_edge_proc(procs, f"127.0.0.1:{port}", f"e{i}", ems[i], tmp_path / f"e{i}.log") for i in range(2)]
        # rounds 0 and 1 are checkpointed; kill in the middle of round 2's steps, or while edges await round 3
        wait_until(
            lambda: (ckpt / "LATEST").exists() and (ckpt / "LATEST").read_text() == "round-000002",
            120,
            "round 1 to be checkpointed",
        )
        if kill_at.startswith("train"):
            wait_until(
                lambda: any(r.get("kind") == "step" and r["round"] == 2 and r["step"] >= 2 for r in _lines(ems[0])),
                60,
                "round 2 steps",
            )
        else:
            wait_until(
                lambda: all(any(r.get("kind") == "push" and r["round"] == 2 for r in _lines(m)) for m in ems),
                60,
                "round 2 pushes",
            )
        server.send_signal(signal.SIGKILL)
        server.wait()
        done = (ckpt / "LATEST").read_text()
        ready.unlink()
        if kill_at == "train-tokens-lost":
            _forget_tokens(ckpt)
        time.sleep(0.5)
        server = _server_proc(procs, cfg_path, port, run_dir, ckpt, ready, slog)
        for e in edges:
            assert e.wait(180) == 0, (tmp_path / "e0.log").read_text()[-3000:]
        assert server.wait(60) == 0
    log = slog.read_text()
    assert "resumed run" in log, log[-3000:]
    if kill_at == "train-tokens-lost":  # each edge process rejoined by itself
        for i in range(2):
            assert "rejoining as" in (tmp_path / f"e{i}.log").read_text()
    assert done in ("round-000002", "round-000003")
    lines = _lines(run_dir / "server_metrics.jsonl")
    assert [r["round"] for r in lines] == list(range(5))  # each round once, none lost, none doubled
    assert_same_factors(_load_final(run_dir), crash_reference, atol=1e-6)


def test_checkpoint_restores_state_and_refuses_another_config(tmp_path):
    from splitwave.server.app import SplitServer

    ckpt = tmp_path / "ckpt"
    cfg = tiny_cfg(server={"checkpoint_dir": str(ckpt)})
    with serving(cfg, tmp_path / "run") as srv:
        res = run_clients(srv.address, ["e0"], EDGE_CACHE)
        assert res["e0"]["rounds"] == 2
        run_id, token_digests = srv.app.run_id, (ckpt / "registry.json").read_text()
        before = final_factors(srv.app)
        top_state = srv.app.trainer.state_dict()
    assert (ckpt / "LATEST").read_text() == "round-000002"
    assert "e0" not in json.loads(token_digests)["clients"]  # it left; and tokens are never stored in clear
    (ckpt / ".tmp-round-000009-dead").mkdir()  # what a crash while writing leaves behind: ignored
    app = SplitServer(cfg, tmp_path / "run2", cache_dir=ROOT / ".cache" / "bundles")
    try:
        assert app.run_id == run_id and app.rounds.round_idx == 2 and app.rounds.stopped
        assert_same_factors(final_factors(app), before)
        got = app.trainer.state_dict()
        for c, slot in top_state["slots"].items():
            for k, v in slot["values"].items():
                np.testing.assert_array_equal(got["slots"][c]["values"][k].numpy(), v.numpy())
    finally:
        app.shutdown()
    other = tiny_cfg(server={"checkpoint_dir": str(ckpt)}, training={"local_steps": 4})
    with pytest.raises(ValueError, match="another config"):
        SplitServer(other, tmp_path / "run3", cache_dir=ROOT / ".cache" / "bundles")
