"""Helpers shared by the network/security/fault tests: one tiny config, in-process servers and edges.

Every test uses the same model, LoRA and seed (so the exported bundle is built once and cached under
.cache/bundles) and sfl-v1 (a top adapter per client), which makes a client's result independent of how
its steps interleave with other clients' steps: runs can then be compared bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from splitwave.protos import splitwave_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / ".cache" / "bundles"
# what a hand-made test client declares at Join (the proto requires a protocol version and a backend)
CAPS = pb.Capabilities(protocol_version=1, backend="custom", codecs=["raw"])

BASE = {
    "seed": 0,
    "num_clients": 1,
    "model": {"family": "bert", "tiny": True, "task": "seq-cls", "num_labels": 2, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 128, "num_eval": 32, "max_seq_len": 16},
    "training": {"mode": "sfl-v1", "batch_size": 8, "local_steps": 3, "optim": {"lr": 0.003}},
    "rounds": {"num_rounds": 2, "deadline_s": 30},
}


def tiny_cfg(overrides: list[str] | None = None, **sections):
    """The shared tiny config; `sections` replace/extend top-level entries, `overrides` are a.b=value."""
    import copy

    from splitwave.common.config import parse_config

    raw = copy.deepcopy(BASE)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return parse_config(raw, overrides or [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cfg, run_dir: Path, credentials=None):
    """An in-process server (app + gRPC) that is always stopped."""
    from splitwave.server.app import SplitServer
    from splitwave.server.service import start_server

    app = SplitServer(cfg, Path(run_dir), cache_dir=BUNDLE_CACHE)
    running = start_server(app, credentials=credentials)
    try:
        yield running
    finally:
        running.stop(0.5)


def make_client(address: str, name: str, cache_dir: Path, cls=None, **opts):
    from splitwave.edge.client import ClientOptions, EdgeClient

    cls = cls or EdgeClient
    return cls(address, ClientOptions(name=name, cache_dir=Path(cache_dir), threads=1, **opts))


def run_clients(
    address: str, names: list[str], cache_dir: Path, timeout: float = 120.0, classes: dict | None = None, **opts
) -> dict:
    """Run edge clients in threads until the server stops them; returns {name: summary or exception}.
    `classes` maps a name to an EdgeClient subclass to run under that name (default EdgeClient)."""
    out: dict = {}

    def go(n):
        c = make_client(address, n, cache_dir, cls=(classes or {}).get(n), **opts)
        try:
            out[n] = c.run()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[n] = e
        finally:
            c.close()

    threads = [threading.Thread(target=go, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "edge clients did not finish"
    return out


def final_factors(app) -> dict[str, np.ndarray]:
    """The run's result: the global edge adapter and the (aggregated) top adapter."""
    return {
        **{f"edge/{k}": np.array(v) for k, v in app.global_edge_factors().items()},
        **{f"top/{k}": np.array(v) for k, v in app.final_top_factors().items()},
    }


def assert_same_factors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rpc_status(fn, *a, **k) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of a call: OK and "" when it succeeds."""
    try:
        fn(*a, **k)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def wait_until(pred, timeout: float, what: str) -> None:
    """Poll `pred` until it holds; fail naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run_with_attack(tmp_path: Path, cfg, cache_dir: Path, attack=None, when=("step", 0, 1)):
    """One honest edge trains `cfg` (2 rounds); `attack(stub, joined, app)` fires once at `when`: ("step",
    round, step) after that step, ("round", round, None) before that round's training. Returns (final factors,
    the attack's result, the server) so a test can compare with a run without the attacker."""
    from splitwave.edge.client import EdgeClient
    from splitwave.protos import splitwave_pb2_grpc as pb_grpc

    box: dict = {}

    class Honest(EdgeClient):
        def _fire(self):
            with grpc.insecure_channel(self.target) as ch:
                box["result"] = attack(pb_grpc.SplitWaveStub(ch), self.joined, srv.app)

        def _record(self, rec):
            super()._record(rec)
            if attack and when[0] == "step" and rec.get("kind") == "step" and (rec["round"], rec["step"]) == when[1:]:
                self._fire()

        def _begin_round(self, round_idx):
            super()._begin_round(round_idx)
            if attack and when[0] == "round" and round_idx == when[1] and "result" not in box:
                self._fire()

    with serving(cfg, tmp_path / "run") as srv:
        c = make_client(srv.address, "honest", cache_dir, cls=Honest)
        try:
            summary = c.run()
        finally:
            c.close()
        assert summary["rounds"] == 2
        return final_factors(srv.app), box.get("result"), srv
