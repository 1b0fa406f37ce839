"""Hostile-input fuzzing of a live server while an honest client trains.

Random bytes (sent through a generic channel with identity serializers, so they reach the server's
deserializer unchanged) and structurally valid but mutated messages (huge/negative dimensions, unknown
dtypes and codecs, NaN/Inf, wrong run ids and tokens, replayed steps under a stolen token for a round that
is not open, oversized streams). Every hostile call must end with an error status (never OK, never UNKNOWN,
which would mean an unhandled server exception); server memory stays bounded; the honest client ends with
exactly the adapters it gets alone.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from net_helpers import ROOT, assert_same_factors, final_factors, make_client, rss_bytes, serving, tiny_cfg

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import encode

EDGE_CACHE = ROOT / ".cache" / "edge-tests"
SECRET = "fuzz-secret"
METHODS = {  # name -> (kind, request class)
    "Join": ("uu", pb.JoinRequest),
    "GetBundle": ("us", pb.BundleRequest),
    "Train": ("ss", pb.TrainRequest),
    "PushAdapter": ("su", pb.AdapterRequest),
    "AwaitRound": ("us", pb.RoundRequest),
    "Evaluate": ("ss", pb.EvalRequest),
    "Leave": ("uu", pb.LeaveRequest),
}


def _cfg():
    return tiny_cfg(
        training={"local_steps": 20}, rounds={"num_rounds": 3}, server={"security": {"enrollment_secret": SECRET}}
    )


def _honest_run(tmp_path, fuzz=None):
    cfg = _cfg()
    with serving(cfg, tmp_path / "run") as srv:
        c = make_client(srv.address, "honest", EDGE_CACHE, enrollment_secret=SECRET)
        c.setup()  # joined: the fuzzer may now use (and abuse) what it saw on the wire
        stats = {}
        t = None
        if fuzz:
            t = threading.Thread(target=fuzz, args=(srv, c.joined, stats))
            t.start()
        try:
            summary = c.run()
        finally:
            c.close()
        if t:
            t.join(300)
        assert summary["rounds"] == 3
        return final_factors(srv.app), stats


class Fuzzer:
    def __init__(self, address: str, joined, seed: int):
        self.ch = grpc.insecure_channel(address)
        self.j = joined
        self.rng = np.random.default_rng(seed)
        ident = lambda b: b  # noqa: E731 - raw bytes both ways
        self.raw = {}
        for m, (kind, _) in METHODS.items():
            path = f"/splitwave.v1.SplitWave/{m}"
            make = {
                "uu": self.ch.unary_unary,
                "us": self.ch.unary_stream,
                "su": self.ch.stream_unary,
                "ss": self.ch.stream_stream,
            }[kind]
            self.raw[m] = (kind, make(path, request_serializer=ident, response_deserializer=ident))

    # -- message makers ------------------------------------------------------------------------------------
    def header(self):
        r = self.rng.integers(6)
        tok, run = self.j.session_token, self.j.run_id
        if r == 0:
            return pb.Header(session_token=self.rng.bytes(16).hex(), run_id=run)
        if r == 1:
            return pb.Header(session_token=tok, run_id="x" + run)  # wrong run id
        if r == 2:
            return pb.Header()
        # the honest client's (stolen) token, but for a round that is never open: nothing may train
        return pb.Header(
            session_token=tok,
            run_id=run,
            round=int(self.rng.integers(99, 1 << 31)),
            step=int(self.rng.integers(0, 1 << 62)),
        )

    def frame(self):
        rng = self.rng
        name = rng.choice(["h", "attention_mask", "labels", "evil", "", "h" * 300])
        a = rng.standard_normal((8, 16, 32)).astype(np.float32)
        k = rng.integers(10)
        if k == 0:
            a[rng.integers(8), 0, 0] = rng.choice([np.nan, np.inf, -np.inf])
        frames = encode(str(name) or "h", a, str(rng.choice(["raw", "fp16", "bf16", "int8", "int4"])) if k else "raw")
        f = frames[0]
        m = rng.integers(9)
        if m == 0:
            del f.shape[:]
            f.shape.extend(int(x) for x in rng.integers(-(1 << 40), 1 << 40, size=rng.integers(0, 40)))
        elif m == 1:
            f.dtype = str(rng.choice(["complex64", "float8", "", "object", "int64"]))
        elif m == 2:
            f.codec = str(rng.choice(["zip", "topk", "", "int8", "int4"]))
            f.topk_k = int(rng.integers(0, 1 << 40))
        elif m == 3:
            f.frame_count, f.frame_index = int(rng.integers(0, 1 << 32)), int(rng.integers(0, 1 << 32))
        elif m == 4:
            f.payload = f.payload[: int(rng.integers(len(f.payload)))]
        elif m == 5:
            f.payload = rng.bytes(int(rng.integers(1, 4096)))
        elif m == 6:
            f.scales, f.indices = rng.bytes(64), rng.bytes(64)
        return f

    def structured(self, method):
        rng = self.rng
        if method == "Join":
            return [
                pb.JoinRequest(
                    client_name=rng.choice(["", "honest", "x" * 100, "a/b", "edge-9"]),
                    enrollment_secret=rng.choice(["", "guess", SECRET[:-1]]),
                )
            ]
        if method == "GetBundle":
            return [pb.BundleRequest(header=self.header(), bundle_hash=rng.bytes(8).hex(), files=["../../etc/passwd"])]
        if method == "AwaitRound":
            h = self.header()
            if h.session_token == self.j.session_token and h.run_id == self.j.run_id:
                h.session_token = "stolen?"  # AwaitRound under a valid token would legitimately answer
            return [pb.RoundRequest(header=h, no_wait=bool(rng.integers(2)))]
        if method == "Leave":
            h = self.header()
            h.session_token = h.session_token[::-1] or "-"  # never the honest client's: Leave would succeed
            return [pb.LeaveRequest(header=h)]
        cls = METHODS[method][1]
        n = int(rng.integers(1, 12))
        if rng.integers(5) == 0:  # an oversized stream: many frames, never a complete step
            n = 200
        hdr = self.header()
        msgs = []
        for _i in range(n):
            if method == "PushAdapter":
                end = pb.AdapterEnd(num_samples=int(rng.integers(0, 9)))
                body = {"frame": self.frame()} if rng.integers(4) else {"end": end}
            else:
                body = {"frame": self.frame()} if rng.integers(4) else {"end_step": pb.StepEnd(batch_size=8)}
            msgs.append(cls(header=hdr, **body))
        return msgs

    # -- sending -------------------------------------------------------------------------------------------
    def send(self, method, payloads: list[bytes]) -> grpc.StatusCode:
        kind, call = self.raw[method]
        try:
            if kind == "uu":
                call(payloads[0], timeout=10)
            elif kind == "us":
                for _ in call(payloads[0], timeout=10):
                    pass
            elif kind == "su":
                call(iter(payloads), timeout=10)
            else:
                for _ in call(iter(payloads), timeout=10):
                    pass
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def one(self):
        method = str(self.rng.choice(list(METHODS)))
        if self.rng.integers(3) == 0:  # random bytes, possibly valid protobuf by chance
            n = 1 if METHODS[method][0][0] == "u" else int(self.rng.integers(1, 5))
            payloads = [self.rng.bytes(int(self.rng.integers(0, 512))) for _ in range(n)]
            if method in ("AwaitRound", "Leave", "Join"):  # keep chance-valid requests from being legitimate
                payloads = [p + b"\x0a\x01x" for p in payloads]
            return method, "random", self.send(method, payloads)
        msgs = self.structured(method)
        return method, "mutated", self.send(method, [m.SerializeToString() for m in msgs])


def fuzz(n: int, seed: int = 0):
    def run(srv, joined, stats):
        gc.collect()
        stats["rss_before"] = rss_bytes()
        f = Fuzzer(srv.address, joined, seed)
        codes = Counter()
        bad = []
        for _ in range(n):
            method, kind, code = f.one()
            codes[code.name] += 1
            if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
                bad.append((method, kind, code.name))
        f.ch.close()
        gc.collect()
        stats.update(codes=dict(codes), bad=bad, rss_after=rss_bytes(), n=n)

    return run


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    return _honest_run(tmp_path_factory.mktemp("alone"))[0]


def _check(stats, n):
    print(
        f"fuzz: {stats['n']} hostile calls, statuses {stats['codes']}, "
        f"RSS {stats['rss_before'] / 2**20:.0f} -> {stats['rss_after'] / 2**20:.0f} MiB"
    )
    assert stats["n"] == n and sum(stats["codes"].values()) == n
    assert not stats["bad"], stats["bad"][:10]
    assert stats["rss_after"] - stats["rss_before"] < 200 * 2**20


def test_fuzz_1000_hostile_calls(tmp_path, alone):
    factors, stats = _honest_run(tmp_path, fuzz(1000, seed=1))
    _check(stats, 1000)
    assert_same_factors(factors, alone)


@pytest.mark.slow
def test_fuzz_10000_hostile_calls(tmp_path, alone):
    factors, stats = _honest_run(tmp_path, fuzz(10000, seed=2))
    _check(stats, 10000)
    assert_same_factors(factors, alone)
