"""The BERT server top on valid tokens only (ServerPart.forward) against every padded position
(ServerPart.forward_padded): one server training step (forward, loss, backward to grad_h and the top's LoRA)
of all-MiniLM-L6-v2's top blocks on real SST-2 training batches, side by side in one process, one thread.

Per shape (rows per step: a lone client step of --batch rows and a fused step of --fused of them) it draws
--samples random batches (trimmed to their longest row, as the edges send them), times both paths on each
(median of --reps after a warm-up), and prints the padded / valid-tokens ratio, the valid share of the
tokens, and how well the engine's cost rule for such a step (splitwave.sim.costs.valid_share_cost, from the
same shape timed with full rows and with half of each row valid, as the cost table is) predicts it.
Checks on every batch that both paths give the same logits and grad_h. Writes
benchmarks/results/server_unpadded.json.

    .venv/bin/python benchmarks/server_unpadded.py [--cut 3 --batch 16 --fused 4 --samples 12 --reps 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitwave.common.config import load_config
from splitwave.server.reference import train_data
from splitwave.server.setup import build_split
from splitwave.sim.costs import median_time, valid_share_cost

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("server_unpadded")


def step(top, path, h0: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """One server step's math (forward, loss, backward): (logits, grad_h)."""
    top.zero_grad(set_to_none=True)
    h = h0.clone().requires_grad_(True)
    logits = path(h, mask)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), h.grad


def timed(fn, reps: int) -> float:
    return median_time(fn, reps, warmup=1)  # the cost table's own timing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cell-1000.yaml")
    p.add_argument("--cut", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fused", type=int, default=4)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "server_unpadded.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(ROOT / args.config, [f"model.cut={args.cut}"])
    split = build_split(cfg)
    top = split.server
    data, _ = train_data(cfg, split)
    hidden = split.peft_model.config.hidden_size
    rng = np.random.default_rng(0)
    full_cache: dict[tuple[int, int], float] = {}
    rows_out = []
    load = os.getloadavg()[0]
    for rows in (args.batch, args.batch * args.fused):
        per = []
        for i in range(args.samples):
            ids, mask_np, labels_np = data.batch(rng.choice(len(data), rows, replace=False))
            b, s = mask_np.shape
            mask, labels = torch.from_numpy(mask_np), torch.from_numpy(labels_np)
            h0 = torch.randn(b, s, hidden)
            out_v, g_v = step(top, top.forward, h0, mask, labels)
            out_p, g_p = step(top, top.forward_padded, h0, mask, labels)
            err = max(float((out_v - out_p).abs().max()), float((g_v - g_p).abs().max()))
            if err > 1e-5:
                raise RuntimeError(f"the two paths disagree by {err} on batch {i} ({b} x {s})")
            padded = timed(lambda: step(top, top.forward_padded, h0, mask, labels), args.reps)
            valid = timed(lambda: step(top, top.forward, h0, mask, labels), args.reps)
            if (b, s) not in full_cache:  # the cost table's kind of points: full rows, half of each row valid
                ones = torch.ones(b, s, dtype=torch.long)
                half = ones.clone()
                half[:, max(1, s // 2) :] = 0
                full_cache[(b, s)] = (
                    timed(lambda: step(top, top.forward, h0, ones, labels), args.reps),
                    timed(lambda: step(top, top.forward, h0, half, labels), args.reps),
                )
            tokens = int(mask_np.sum())
            predicted = valid_share_cost(*full_cache[(b, s)], tokens / (b * s))
            per.append(
                {
                    "rows": b,
                    "seq": s,
                    "tokens": tokens,
                    "padded_s": padded,
                    "valid_s": valid,
                    "predicted_s": predicted,
                    "max_abs_diff": err,
                }
            )
            log.info(
                "%d x %d, %d%% valid: padded %.1f ms, valid tokens %.1f ms (%.2fx), rule %.1f ms",
                b,
                s,
                100 * tokens // (b * s),
                1e3 * padded,
                1e3 * valid,
                padded / valid,
                1e3 * predicted,
            )
        summary = {
            "rows": rows,
            "batches": len(per),
            "valid_share": sum(x["tokens"] for x in per) / sum(x["rows"] * x["seq"] for x in per),
            "padded_ms": 1e3 * statistics.median(x["padded_s"] for x in per),
            "valid_ms": 1e3 * statistics.median(x["valid_s"] for x in per),
            "speedup": statistics.median(x["padded_s"] / x["valid_s"] for x in per),
            "rule_over_measured": statistics.median(x["predicted_s"] / x["valid_s"] for x in per),
            "steps": per,
        }
        rows_out.append(summary)
    print(f"\nMiniLM top (blocks {args.cut}-5 + head), one thread, SST-2 batches; load average {load:.1f} at start")
    print(
        f"{'rows':>5} {'valid share':>11} {'padded ms':>10} {'valid-token ms':>14} {'speed-up':>8} {'rule/measured':>13}"
    )
    for r in rows_out:
        print(
            f"{r['rows']:>5} {r['valid_share']:>11.2f} {r['padded_ms']:>10.1f} {r['valid_ms']:>14.1f} "
            f"{r['speedup']:>7.2f}x {r['rule_over_measured']:>13.2f}"
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {"config": args.config, "cut": args.cut, "load_average_at_start": load, "shapes": rows_out}, indent=1
        )
        + "\n"
    )
    print(f"written {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
