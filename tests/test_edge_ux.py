"""The edge client as a new user meets it: fast one-line connection failures, retries only for what can heal,
a device that finds (or clearly misses) its data before the bundle download, progress per round, and a
session the server lost (UNAUTHENTICATED) resumed by a rejoin.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from net_helpers import BUNDLE_CACHE, ROOT, free_port, make_client, run_clients, serving, tiny_cfg
from test_security import _sec_cfg, pki  # noqa: F401 - the PKI fixture (CA, server and client certificates)

from splitwave.cli import main
from splitwave.common.paths import DataNotFound, data_dirs, find_data_file
from splitwave.edge.client import ClientOptions, EdgeClient, format_summary, round_line
from splitwave.edge.retry import Retrier, RetryPolicy, Unreachable, diagnose, recovering
from splitwave.launch import CLI
from splitwave.server.security import server_credentials

EDGE_CACHE = ROOT / ".cache" / "edge-tests"


def _edge_cli(capsys, *argv) -> tuple[int, list[str]]:
    """Run `splitwave edge` in this process; (exit code, non-empty stderr lines of the CLI itself)."""
    rc = main(["edge", *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("splitwave edge:")]
    return rc, err


# -- connection failures -----------------------------------------------------------------------------------


def test_nothing_listening_fails_within_the_connect_time_naming_the_address(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    p = subprocess.run(
        [*CLI, "edge", "--server", f"127.0.0.1:{port}", "--name", "e0", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.monotonic() - t0
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "connection refused" in lines[0], lines[0]
    # the retries are announced with attempt number and wait, and stop within --connect-timeout (5 s)
    assert "attempt 1 failed, retrying in" in p.stderr
    gave_up = float(lines[0].split(" attempts in ")[1].split(" s")[0])
    assert gave_up <= RetryPolicy.connect_s
    assert wall < 60, wall  # was 11 minutes; a gross bound only (the machine is shared)


def test_tls_mismatch_fails_at_once_both_ways(tmp_path, pki, capsys):  # noqa: F811
    """--ca against a plaintext server, and plaintext against a TLS server: one line each, no retries."""
    plain_cfg, tls_cfg = tiny_cfg(), _sec_cfg(pki)
    with (
        serving(plain_cfg, tmp_path / "plain") as plain,
        serving(tls_cfg, tmp_path / "tls", credentials=server_credentials(tls_cfg.server.security)) as tls,
    ):
        cache = str(tmp_path / "cache")
        rc, err = _edge_cli(
            capsys, "--server", plain.address, "--cache-dir", cache, "--ca", pki["ca"], "--connect-timeout", "60"
        )
        assert rc == 1 and len(err) == 1, err
        assert plain.address in err[0] and "does not speak TLS" in err[0] and "drop --ca" in err[0], err
        rc, err = _edge_cli(capsys, "--server", tls.address, "--cache-dir", cache, "--connect-timeout", "60")
        assert rc == 1 and len(err) == 1, err
        assert tls.address in err[0] and "expects TLS" in err[0] and "--ca" in err[0], err
        rc, err = _edge_cli(
            capsys, "--server", tls.address, "--cache-dir", cache, "--ca", pki["rogue_cert"], "--connect-timeout", "60"
        )
        assert rc == 1 and len(err) == 1 and "not signed by the CA" in err[0], err
        assert not plain.app.by_client and not tls.app.by_client


def test_a_server_that_comes_up_late_is_reached_by_retries(tmp_path, caplog):
    from splitwave.server.app import SplitServer
    from splitwave.server.service import start_server

    port = free_port()
    caplog.set_level(logging.WARNING, logger="splitwave.edge.retry")
    out = {}

    def edge():
        c = make_client(f"127.0.0.1:{port}", "late", EDGE_CACHE, retry=RetryPolicy(connect_s=120))
        try:
            out["summary"] = c.run()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["summary"] = e
        finally:
            c.close()

    t = threading.Thread(target=edge)
    t.start()
    try:
        end = time.monotonic() + 60
        while not any("attempt 2 failed" in r.getMessage() for r in caplog.records) and time.monotonic() < end:
            time.sleep(0.05)
        app = SplitServer(tiny_cfg(), tmp_path / "run", cache_dir=BUNDLE_CACHE)
        srv = start_server(app, port=port)
        try:
            t.join(180)
        finally:
            srv.stop(0.5)
    finally:
        t.join(10)
    assert isinstance(out["summary"], dict) and out["summary"]["rounds"] == 2, out
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2 and all(f"127.0.0.1:{port}" in m for m in retries)
    assert [int(m.split("attempt ")[1].split()[0]) for m in retries][:2] == [1, 2]


class _Err(grpc.RpcError):
    def __init__(self, code, details):
        self._c, self._d = code, details

    def code(self):
        return self._c

    def details(self):
        return self._d


def test_only_healable_failures_are_retried_and_the_budget_holds():
    """The policy itself, with the error strings gRPC gives (taken from real failed calls)."""
    refused = _Err(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:127.0.0.1:9: Failed to connect to remote host: Connection refused",
    )
    assert diagnose(refused, "h:9", False, reached=False)[0] is True
    wrong_tls = _Err(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:127.0.0.1:9: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:"
        "SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
    )
    assert diagnose(wrong_tls, "h:9", True, reached=True)[0] is False
    closed = _Err(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: Socket closed",
    )
    assert diagnose(closed, "h:9", False, reached=False)[0] is False  # a TLS server, before first contact
    assert diagnose(closed, "h:9", False, reached=True)[0] is True  # a server going down, later
    dns = _Err(
        grpc.StatusCode.UNAVAILABLE,
        "errors resolving x.invalid:1: [field:hostname lookup error:address "
        "lookup failed for x.invalid:1: Domain name not found]",
    )
    assert diagnose(dns, "x.invalid:1", False, reached=False)[0] is False
    assert diagnose(_Err(grpc.StatusCode.INVALID_ARGUMENT, "bad h"), "h:9", False, True)[0] is None
    assert diagnose(_Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded"), "h", False, True)[0]
    assert diagnose(_Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "all 2 client slots are taken"), "h", 0, 1)[0] is None

    slept = []
    r = Retrier("h:9", RetryPolicy(total_s=30, first_wait_s=1, max_wait_s=8), sleep=slept.append)
    r.reached = True
    calls = []

    def flaky(left):
        calls.append(left)
        if len(calls) < 4:
            raise refused
        return "ok"

    assert r.call(flaky, "X") == "ok" and len(slept) == 3 and r.retries == 3
    with pytest.raises(Unreachable, match="h:9"):
        r.call(lambda left: (_ for _ in ()).throw(wrong_tls), "X")
    # a busy server (full call slots) has answered: its retries get the long budget, not the connect time
    busy = _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded")
    fresh = Retrier("h:9", RetryPolicy(connect_s=0.1, total_s=30, first_wait_s=1), sleep=slept.append)
    answers = iter([busy, busy, "joined"])

    def join(left):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert fresh.call(join, "Join") == "joined" and fresh.retries == 2
    with pytest.raises(grpc.RpcError):  # the server's own answer goes back to the caller untouched
        r.call(lambda left: (_ for _ in ()).throw(_Err(grpc.StatusCode.INVALID_ARGUMENT, "bad")), "X")


def test_recoveries_in_a_row_are_bounded():
    """`recovering` (a lost session: rejoin, then call again): at most `limit` recoveries, the next failure is
    raised; other errors pass through untouched."""
    recovered = []

    def failing(n):
        left = iter(range(n))

        def fn():
            if next(left, None) is not None:
                raise KeyError("lost")
            return "done"

        return fn

    assert recovering(failing(2), KeyError, recovered.append, limit=2) == "done" and len(recovered) == 2
    with pytest.raises(KeyError):
        recovering(failing(3), KeyError, recovered.append, limit=2)
    assert len(recovered) == 4
    with pytest.raises(ValueError):
        recovering(lambda: int("x"), KeyError, recovered.append, limit=2)


def test_a_backend_other_than_onnxruntime_comes_as_a_factory():
    """The edge client has one backend built in; another (the torch reference) is passed by the caller."""
    with pytest.raises(ValueError, match="make_backend"):
        EdgeClient("h:9", ClientOptions(backend="torch"))
    EdgeClient("h:9", ClientOptions(backend="torch"), make_backend=lambda bundle, settings: None).close()


# -- data on the device ------------------------------------------------------------------------------------

SST2_CFG = {
    "model": {"family": "bert", "tiny": True, "task": "seq-cls", "num_labels": 2, "cut": 2, "tokenizer": "minilm"},
    "data": {"dataset": "sst2", "num_train": 32, "num_eval": 16, "max_seq_len": 16},
    "rounds": {"num_rounds": 2, "deadline_s": 300},
}


def _tiny_sst2(root: Path) -> Path:
    """A data folder in the documented layout with a small SST-2 (train and dev)."""
    (root / "sst2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "dull", "film", "story", "acting", "plot"]
    for name, n in (("train.tsv", 64), ("dev.tsv", 24)):
        rows = ["sentence\tlabel"] + [" ".join(rng.choice(words, 6)) + f" \t{i % 2}" for i in range(n)]
        (root / "sst2" / name).write_text("\n".join(rows) + "\n")
    return root


def test_data_search_order_and_the_error_names_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITWAVE_DATA_DIR", raising=False)
    monkeypatch.setenv("SPLITWAVE_SHARED", str(tmp_path / "shared"))
    assert data_dirs() == [(tmp_path / "shared" / "data", "$SPLITWAVE_SHARED/data")]
    monkeypatch.setenv("SPLITWAVE_DATA_DIR", str(tmp_path / "env"))
    assert data_dirs()[0][0] == tmp_path / "env"
    assert data_dirs(tmp_path / "flag") == [(tmp_path / "flag", "--data-dir")]  # the flag wins
    data = _tiny_sst2(tmp_path / "flag")
    assert find_data_file("sst2/train.tsv", data) == data / "sst2" / "train.tsv"
    monkeypatch.delenv("SPLITWAVE_DATA_DIR")
    monkeypatch.delenv("SPLITWAVE_SHARED")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFound) as e:  # a name no checkout has, so that ../shared/data misses it too
        find_data_file("sst2/absent.tsv")
    msg = str(e.value)
    assert "sst2/absent.tsv" in msg and str(tmp_path / "data" / "sst2" / "absent.tsv") in msg
    assert "../shared/data" in msg and "--data-dir" in msg and "SPLITWAVE_DATA_DIR" in msg


def test_missing_data_is_reported_after_join_before_the_bundle_download(tmp_path, monkeypatch, capsys):
    data = _tiny_sst2(tmp_path / "device-data")
    monkeypatch.setenv("SPLITWAVE_DATA_DIR", str(data))  # the server's copy (eval split and shards)
    cfg = tiny_cfg(**SST2_CFG)
    with serving(cfg, tmp_path / "run") as srv:
        cache = tmp_path / "cache"
        rc, err = _edge_cli(
            capsys,
            "--server",
            srv.address,
            "--name",
            "e0",
            "--cache-dir",
            str(cache),
            "--data-dir",
            str(tmp_path / "empty"),
        )
        assert rc == 1 and len(err) == 1, err
        assert "sst2/train.tsv" in err[0] and str(tmp_path / "empty" / "sst2" / "train.tsv") in err[0], err
        assert not [p for p in cache.glob("*") if p.is_dir() and p.name != "sessions"]  # no bundle downloaded
        assert not srv.app.by_client  # it left: its slot is free again
        # the same device with its data in place (found through the environment variable) trains
        res = run_clients(srv.address, ["e0"], cache)
        assert isinstance(res["e0"], dict) and res["e0"]["rounds"] >= 1, res
        assert res["e0"]["last_round"]["steps"] == cfg.training.local_steps


# -- progress ----------------------------------------------------------------------------------------------


def test_progress_line_per_round_and_a_readable_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitwave.edge.client")
    metrics = tmp_path / "e0.jsonl"
    with serving(tiny_cfg(), tmp_path / "run") as srv:
        res = run_clients(srv.address, ["e0"], EDGE_CACHE, metrics_path=metrics)
    s = res["e0"]
    assert isinstance(s, dict) and s["rounds"] == 2, res
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert len(lines) == 2
    for i, ln in enumerate(lines):
        assert ln.startswith(f"round {i}: 3 steps, loss ") and "accuracy" in ln and " up " in ln and " down " in ln
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["kind"] for r in recs].count("round") == 2 and recs[-1]["kind"] == "summary"
    assert round_line(next(r for r in recs if r["kind"] == "round")) == lines[0]
    assert s["peak_rss_bytes"] > 10 << 20 and s["bytes_up"] > 0 and s["bytes_down"] > 0
    text = format_summary(s)
    assert "edge e0 done: 2 rounds" in text and "peak RSS" in text and "MiB" in text and "traffic" in text


# -- a session the server lost -----------------------------------------------------------------------------


def test_session_lost_mid_round_rejoins_and_redoes_the_round(tmp_path):
    """What an edge meets after a server restart that does not keep session tokens: UNAUTHENTICATED in the middle
    of a round. It rejoins under its name with its resume secret and redoes the round from its start."""
    seen = {}

    class Victim(EdgeClient):
        def _record(self, rec):
            super()._record(rec)
            if rec.get("kind") == "step" and (rec["round"], rec["step"]) == (0, 1) and "token" not in seen:
                seen["token"], seen["secret"] = self.joined.session_token, self._resume_secret
                seen["start"] = {k: v.copy() for k, v in self._round_start[1].items()}
                srv.app.sessions.pop(self.joined.session_token)  # the server forgets the token

        def _begin_round(self, round_idx):
            super()._begin_round(round_idx)
            if round_idx == 0 and "token" in seen and "redo" not in seen:
                seen["redo"] = {k: v.copy() for k, v in self.runtime.factors.items()}

    with serving(tiny_cfg(), tmp_path / "run") as srv:
        c = make_client(srv.address, "e0", tmp_path / "cache", cls=Victim)
        try:
            summary = c.run()
            steps = [(r["round"], r["step"]) for r in c.history if r["kind"] == "step"]
        finally:
            c.close()
        assert summary["rounds"] == 2 and summary["rejoins"] == 1
        assert steps == [(0, 0), (0, 1), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        assert c.joined.client_id == "e0" and c.joined.session_token != seen["token"]
        for k, v in seen["start"].items():  # the redo started from the round's start, not from step 1
            np.testing.assert_array_equal(seen["redo"][k], v)
        # a resume secret (from a server that hands them out) is kept owner-only, for a restarted process
        files = list((tmp_path / "cache" / "sessions").glob("e0-*.json"))
        if c._resume_secret:
            assert len(files) == 1 and files[0].stat().st_mode & 0o077 == 0
            assert json.loads(files[0].read_text())["resume_secret"] == c._resume_secret
        else:
            assert not files


def test_peak_rss_is_this_process_not_the_parent_that_forked_it():
    """ru_maxrss survives fork + exec: an edge started by a big process (a test runner, the simulator) would
    report the parent's size. The summary's figure must be the edge's own."""
    from splitwave.edge.client import peak_rss_bytes

    ballast = bytearray(300 << 20)  # touch 300 MiB in this (parent) process
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from splitwave.edge.client import peak_rss_bytes; print(peak_rss_bytes())"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    child = int(p.stdout.strip())
    assert child < 200 << 20 < peak_rss_bytes(), (child, peak_rss_bytes())
    del ballast
