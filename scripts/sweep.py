"""Run `splitwave simulate` once per value of one config field and put the runs side by side.

    .venv/bin/python scripts/sweep.py configs/codec-comparison.yaml --param training.codec_up --values raw fp16 int8 topk
    .venv/bin/python scripts/sweep.py configs/cut-sweep.yaml --param model.cut --values 1 2 3

Writes runs/<name>-sweep/<timestamp>/: sweep.json, sweep.md (table) and sweep.png (final accuracy vs
uplink bytes and vs simulated time). Sweeping `model.cut` also runs `splitwave plan` for those cuts and
adds the predicted round time next to the measured (simulated) one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from splitwave.common.config import load_config
from splitwave.plan import plan
from splitwave.runner import simulate


def _mean_round(recs: list[dict], key: str) -> float:
    vals = [r[key] for r in recs[1:]] or [r[key] for r in recs]  # steady state: round 0 carries warm-up
    return sum(vals) / len(vals)


def sweep(config: str, param: str, values: list[str], overrides: list[str], out: Path | None = None) -> dict:
    """One `splitwave simulate` run per value of `param` (plus the plan's predictions for `model.cut`); the
    rows, also written to OUT as sweep.json, sweep.md and sweep.png."""
    base = load_config(config, overrides)
    out = out or Path(base.output_dir) / f"{base.name}-sweep" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in values:
        cfg = load_config(config, overrides + [f"{param}={v}", f"output_dir={out / 'runs'}"])
        run_dir = simulate(cfg, progress=False)
        summ = json.loads((run_dir / "summary.json").read_text())
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows.append(
            {
                "value": v,
                "run_dir": str(run_dir),
                "final_accuracy": summ["final_accuracy"],
                "final_loss": summ["final_loss"],
                "bytes_up": summ["total_bytes_up"],
                "bytes_down": summ["total_bytes_down"],
                "sim_time_s": summ["total_sim_time_s"],
                "mean_round_s": _mean_round(recs, "sim_round_s"),
                "wall_s": summ["wall_time_s"],
            }
        )
        print(
            f"{param}={v}: accuracy {summ['final_accuracy']:.3f}, up {summ['total_bytes_up'] / 1e6:.2f} MB, "
            f"simulated {summ['total_sim_time_s']:.1f} s",
            flush=True,
        )
    if param == "model.cut":
        pl = plan(base, cuts=[int(v) for v in values], out=out / "plan.json", quiet=True)
        by_cut = {r["cut"]: r for r in pl["cuts"]}
        for row in rows:
            p = by_cut[int(row["value"])]
            row.update(
                predicted_model_s=p["model_s"],
                predicted_sim_s=p["sim_s"],
                prediction_err=p["sim_s"] / row["mean_round_s"] - 1.0,
            )
    res = {"config": config, "param": param, "values": values, "overrides": overrides, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(res, indent=1))
    cols = ["value", "final_accuracy", "bytes_up", "bytes_down", "sim_time_s", "mean_round_s", "wall_s"]
    if param == "model.cut":
        cols += ["predicted_sim_s", "predicted_model_s", "prediction_err"]
    lines = ["| " + " | ".join([param] + cols[1:]) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out / "sweep.png", rows, param)
    print(f"sweep written to {out}")
    res["dir"] = str(out)
    return res


def _plot(path: Path, rows: list[dict], param: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3 if param == "model.cut" else 2, figsize=(13 if param == "model.cut" else 9, 4))
    for r in rows:
        ax[0].scatter(r["bytes_up"] / 1e6, r["final_accuracy"])
        ax[0].annotate(str(r["value"]), (r["bytes_up"] / 1e6, r["final_accuracy"]))
        ax[1].scatter(r["sim_time_s"], r["final_accuracy"])
        ax[1].annotate(str(r["value"]), (r["sim_time_s"], r["final_accuracy"]))
    ax[0].set_xlabel("uplink MB (all clients)")
    ax[1].set_xlabel("simulated training time (s)")
    for a in ax[:2]:
        a.set_ylabel("final eval accuracy")
        a.grid(alpha=0.3)
    if param == "model.cut":
        cuts = [int(r["value"]) for r in rows]
        ax[2].plot(cuts, [r["mean_round_s"] for r in rows], "o-", label="measured (virtual time)")
        ax[2].plot(cuts, [r["predicted_sim_s"] for r in rows], "s--", label="plan: simulated")
        ax[2].plot(cuts, [r["predicted_model_s"] for r in rows], "^:", label="plan: closed form")
        ax[2].set_xlabel("cut layer")
        ax[2].set_ylabel("round time (s)")
        ax[2].legend(fontsize=8)
        ax[2].grid(alpha=0.3)
    fig.suptitle(f"sweep over {param}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--param", required=True, help="dotted config field, e.g. training.codec_up")
    p.add_argument("--values", nargs="+", required=True)
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sweep(args.config, args.param, args.values, args.set, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
