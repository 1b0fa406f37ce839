"""Helpers shared by the network/security/fault tests: the tiny config, in-process servers and edges.

The tiny config, the in-process server and the edges in threads are the package's (`splitwave.inprocess`,
also used by the benchmarks); here they get the tests' bundle cache, built once and kept under .cache/bundles.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from splitwave import inprocess
from splitwave.inprocess import final_factors, make_client, run_clients
from splitwave.inprocess import tiny_config as tiny_cfg
from splitwave.protos import splitwave_pb2 as pb
from splitwave.server.service import RunningServer

__all__ = ["final_factors", "make_client", "run_clients", "tiny_cfg"]  # re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / ".cache" / "bundles"
EDGE_CACHE = ROOT / ".cache" / "edge-tests"  # the edges' bundle downloads, shared by the tests
# what a hand-made test client declares at Join (the proto requires a protocol version and a backend)
CAPS = pb.Capabilities(protocol_version=1, backend="custom", codecs=["raw"])
BASE = inprocess.TINY_CONFIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cfg, run_dir: Path, credentials=None) -> Iterator[RunningServer]:
    """An in-process server (app + gRPC) with the tests' bundle cache, always stopped."""
    with inprocess.serving(cfg, run_dir, BUNDLE_CACHE, credentials) as running:
        yield running


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
