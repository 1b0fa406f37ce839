"""Honest adapter-update norms per round: what `aggregation.robust.clip_norm` must stay above.

Runs a config in-process (server + its edge clients in threads, plain loopback, no channel) with clipping
OFF and prints, per round, the largest L2 norm of a client's adapter update (uploaded factors minus the
round's start; `update_norm_max` of the edge aggregation, and of sfl-v1's top aggregation when there is one)
and the eval accuracy. Writes benchmarks/results/update_norms-<config>.json.

    .venv/bin/python benchmarks/update_norms.py configs/quick.yaml [--set training.mode=sfl-v1 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path

from splitwave.common.config import load_config
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.server.aggregation.base import Strategy
from splitwave.server.app import SplitServer
from splitwave.server.service import start_server

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bundles"))
    args = ap.parse_args()
    cfg = load_config(args.config, ["channel.mode=none", "aggregation.robust.clip_norm=null", *args.set])
    top_norms: list[float] = []
    original = Strategy._prepare

    def spy(self, results):  # the top strategy's norms are not in the metrics file: record them here
        out = original(self, results)
        if self.scope == "top":
            top_norms.append(out[3]["update_norm_max"])
        return out

    Strategy._prepare = spy
    with tempfile.TemporaryDirectory() as tmp:
        app = SplitServer(cfg, Path(tmp) / "run", cache_dir=Path(args.cache))
        errors = []
        with start_server(app) as srv:

            def go(i):
                c = EdgeClient(srv.address, ClientOptions(name=f"e{i}", cache_dir=Path(tmp) / "edge", threads=1))
                try:
                    c.run()
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                finally:
                    c.close()

            threads = [threading.Thread(target=go, args=(i,)) for i in range(cfg.num_clients)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        if errors:
            raise SystemExit(f"clients failed: {errors}")
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "server_metrics.jsonl").read_text().splitlines()]
    rows = [
        {
            "round": ln["round"],
            "edge_update_norm_max": ln["aggregation"].get("update_norm_max"),
            "edge_update_norm_mean": ln["aggregation"].get("update_norm_mean"),
            "top_update_norm_max": top_norms[i] if i < len(top_norms) else None,
            "eval_accuracy": ln.get("eval_accuracy"),
        }
        for i, ln in enumerate(lines)
    ]
    for r in rows:
        print(json.dumps(r))
    out = ROOT / "benchmarks" / "results" / f"update_norms-{cfg.name}-{cfg.training.mode}.json"
    out.write_text(json.dumps({"config": args.config, "set": args.set, "rounds": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
