"""Issue 12's numeric probes against a live in-process server with an honest edge; one JSON line per probe.

Each probe runs the tiny config (`splitwave.inprocess`; sfl-v2, or sfl-v1 where stated) with one honest
edge; after its step 1 of round 0 (or before a round's training) a hostile message is sent with the honest
client's token.
Reported: the gRPC status the attacker got, whether the honest edge finished, how far the final global
adapters are from those of a run without the attack (max |diff|; 0.0 = bit-identical) and their largest
|value| (NaN shows as nan). The figures of docs/security.md come from this script, run on the code before
and after the guards (copy it into the older tree to run it there).

    .venv/bin/python benchmarks/hostile_probes.py
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import grpc
import numpy as np

from splitwave.edge.client import EdgeClient
from splitwave.inprocess import final_factors, make_client, run_clients, serving, tiny_config
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import encode

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / ".cache" / "bundles"
B, S, H = 8, 16, 32


def main() -> None:
    cache = ROOT / ".cache" / "edge-tests"

    def hdr(j, r=0, step=2):
        return pb.Header(session_token=j.session_token, run_id=j.run_id, round=r, step=step)

    def train(stub, j, h):
        msgs = [
            pb.TrainRequest(header=hdr(j), frame=f)
            for n, a in (("h", h), ("attention_mask", np.ones((B, S), np.int64)), ("labels", np.zeros(B, np.int64)))
            for f in encode(n, a)
        ] + [pb.TrainRequest(header=hdr(j), end_step=pb.StepEnd(batch_size=B))]
        try:
            for _ in stub.Train(iter(msgs), timeout=30):
                pass
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
        return "OK"

    def push(stub, j, value=0.0, metrics=None, r=0):
        fs = {f["name"]: np.full(f["shape"], value, np.float32) for f in json.loads(j.manifest_json)["factors"]}
        msgs = [pb.AdapterRequest(header=hdr(j, r), frame=f) for k, v in fs.items() for f in encode(k, v)]
        msgs.append(pb.AdapterRequest(header=hdr(j, r), end=pb.AdapterEnd(num_samples=8, metrics=metrics or {})))
        try:
            stub.PushAdapter(iter(msgs), timeout=30)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
        return "OK"

    def run(tmp, attack=None, when=("step", 0), overrides=(), mode="sfl-v2"):
        cfg = tiny_config(list(overrides), training={"mode": mode})
        box = {}

        class Honest(EdgeClient):
            def _fire(self):
                with grpc.insecure_channel(self.target) as ch:
                    box["status"] = attack(pb_grpc.SplitWaveStub(ch), self.joined, srv.app)

            def _record(self, rec):
                super()._record(rec)
                if (
                    attack
                    and when[0] == "step"
                    and rec.get("kind") == "step"
                    and (rec["round"], rec["step"]) == (when[1], 1)
                    and "status" not in box
                ):
                    self._fire()

            def _begin_round(self, r):
                super()._begin_round(r)
                if attack and when[0] == "round" and r == when[1] and "status" not in box:
                    self._fire()

        with serving(cfg, Path(tmp), BUNDLE_CACHE) as srv:
            c = make_client(srv.address, "honest", cache, cls=Honest)
            try:
                c.run()
                honest = "finished"
            except Exception as e:  # noqa: BLE001 - the probe's outcome
                honest = f"failed: {type(e).__name__}: {str(e)[:120]}"
            finally:
                c.close()
            metrics = Path(tmp) / "server_metrics.jsonl"
            return final_factors(srv.app), box.get("status"), honest, metrics.stat().st_size if metrics.exists() else 0

    def compare(a, b) -> tuple[float, float]:
        """(max |a - b|, max |a|) over all factors; NaN when any value is NaN (Python's max would hide it)."""
        diff = np.concatenate([np.abs(np.asarray(a[k], np.float64) - b[k]).ravel() for k in a])
        top = np.concatenate([np.abs(np.asarray(a[k], np.float64)).ravel() for k in a])
        return float(np.max(diff)), float(np.max(top))

    def digest(f) -> str:
        return hashlib.sha256(b"".join(np.ascontiguousarray(f[k]).tobytes() for k in sorted(f))).hexdigest()[:16]

    probes = {
        "train_h_float64_1e300": (lambda s, j, app: train(s, j, np.full((B, S, H), 1e300)), {}),
        "train_h_float32_1e30": (lambda s, j, app: train(s, j, np.full((B, S, H), 1e30, np.float32)), {}),
        "train_h_float32_1e20_alternating": (
            lambda s, j, app: train(
                s, j, (np.sign(np.random.default_rng(0).standard_normal((B, S, H))) * 1e20).astype(np.float32)
            ),
            {},
        ),
        "push_adapter_1e30": (lambda s, j, app: push(s, j, 1e30), {}),
        "push_metrics_12000_entries": (
            lambda s, j, app: push(s, j, metrics={f"m{i:05d}".ljust(60, "x"): float(i) for i in range(12000)}),
            {},
        ),
        "push_before_training_round1": (lambda s, j, app: push(s, j, r=1), {"when": ("round", 1)}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        refs = {m: run(f"{tmp}/ref-{m}", mode=m) for m in ("sfl-v2", "sfl-v1")}
        for m, ref in refs.items():
            print(
                json.dumps(
                    {
                        "probe": "none (honest edge alone)",
                        "mode": m,
                        "honest_edge": ref[2],
                        "final_sha256": digest(ref[0]),
                        "final_max_abs": compare(ref[0], ref[0])[1],
                    }
                ),
                flush=True,
            )
        for name, (attack, kw) in probes.items():
            for mode in ("sfl-v2", "sfl-v1"):
                got, status, honest, mbytes = run(f"{tmp}/{name}-{mode}", attack, mode=mode, **kw)
                diff, top = compare(got, refs[mode][0])
                print(
                    json.dumps(
                        {
                            "probe": name,
                            "mode": mode,
                            "attacker_status": (status or "")[:160],
                            "honest_edge": honest,
                            "final_max_abs_diff_vs_no_attack": diff,
                            "final_max_abs": top if math.isfinite(top) else str(top),
                            "final_nonfinite_values": int(sum(np.count_nonzero(~np.isfinite(v)) for v in got.values())),
                            "metrics_file_bytes": mbytes,
                            "metrics_file_bytes_no_attack": refs[mode][3],
                        }
                    ),
                    flush=True,
                )

        # 2 clients, one claiming 2^64-1 samples (sfl-v1: a client's result does not depend on interleaving)
        class Liar(EdgeClient):
            def setup(self):
                super().setup()
                self.num_samples = 2**64 - 1

        cfg = tiny_config(num_clients=2)
        outs = {}
        for name, classes in (("truthful", None), ("liar", {"mallory": Liar})):
            with serving(cfg, Path(tmp) / f"ns-{name}", BUNDLE_CACHE) as srv:
                run_clients(srv.address, ["alice", "mallory"], cache, classes=classes)
                outs[name] = final_factors(srv.app)
        print(
            json.dumps(
                {
                    "probe": "push_num_samples_2^64-1",
                    "mode": "sfl-v1",
                    "final_max_abs_diff_vs_truthful": compare(outs["liar"], outs["truthful"])[0],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
