"""Measured codec table: what each activation/gradient codec (and the channel-aware policy) costs and buys.

all-MiniLM-L6-v2 (cut 3, LoRA r 8) on SST-2, 8 clients in the wireless cell of configs/sst2-minilm-wireless.yaml
on the simulation engine (channel.mode virtual: exact bytes through each client's radio link, compute from the
cost model), the same step budget for every row (rounds x clients x local steps x batch; the round deadline
is out of reach, so no row loses steps to it), seeds 0 and 1 (the seed also places the clients in the cell).

Rows (--rows picks some; a row whose config keys or codecs this checkout lacks is reported as unavailable):
    reference       fp32 "raw", padded steps: today's default (the row every ratio is against)
    packed-fp32     packed steps (training.packed), raw
    packed-fp16     packed, fp16 up and down
    packed-int8     packed, int8 up and down
    packed-int4     packed, int4 up and down
    packed-int4-ef  packed, int4 up and down with error feedback (training.error_feedback: [up, down])
    policy          packed, channel-aware codecs per client and step (ladder raw > fp16 > int8 > int4 where
                    int4 exists, --budget seconds per step and direction)
plus centralized LoRA on the union of the clients' data with the same steps (--skip-centralized to leave out).

Columns: uplink and downlink bytes per training sample (all training traffic: activations, gradients,
adapters, round assignments; samples = steps x batch), final dev accuracy (mean of the last 4 evaluations),
simulated training time (the per-round global evaluation excluded) until the dev accuracy first reaches
--target (0.82; "not reached" if never) and --target2 (0.80), each as
mean +- half the spread over the seeds, and the ratio to the reference row. Writes results/codecs/TAG.json,
TAG.md and TAG.png; runs go to results/codecs/runs/.

    python scripts/codec_table.py                       # the full table (hours on a laptop)
    python scripts/codec_table.py --quick               # tiny BERT, 2 clients, 2 rounds: a smoke test in minutes
    python scripts/codec_table.py --rows reference policy --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from splitwave.common.batching import Batcher
from splitwave.common.config import ConfigError, all_keys, parse_config
from splitwave.common.shard import build_token_dataset
from splitwave.protos.codec import CODECS
from splitwave.runner import simulate
from splitwave.server.datasets import data_spec
from splitwave.server.reference import dev_accuracy, make_optimizer, train_data, unsplit_step
from splitwave.server.setup import build_split, tokenizer_source
from splitwave.server.trainer import trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results/codecs"
CELL = ROOT / "configs/sst2-minilm-wireless.yaml"
log = logging.getLogger("codecs")


def _lossy(codec: str) -> dict[str, Any]:
    return {
        "packed": True,
        "codec_up": codec,
        "codec_down": codec,
        "codec_adapter_up": codec,
        "codec_adapter_down": codec,
    }


ROWS: dict[str, dict[str, Any]] = {
    "reference": {"packed": False, "codec_up": "raw", "codec_down": "raw"},
    "packed-fp32": {"packed": True, "codec_up": "raw", "codec_down": "raw"},
    # a lossy row compresses every tensor on the link: h up, grad_h down, the adapters both ways
    "packed-fp16": {**_lossy("fp16")},
    "packed-int8": {**_lossy("int8")},
    "packed-int4": {**_lossy("int4")},
    "packed-int4-ef": {**_lossy("int4"), "error_feedback": ["up", "down", "adapter_up", "adapter_down"]},
    "policy": {
        "packed": True,
        "codec_up": "raw",
        "codec_down": "raw",
        "codec_adapter_up": "int8",
        "codec_adapter_down": "int8",
        "codec_policy": "channel_aware",
    },
}
LABELS = {
    "reference": "fp32, padded (today's default)",
    "packed-fp32": "fp32, packed",
    "packed-fp16": "fp16, packed",
    "packed-int8": "int8, packed",
    "packed-int4": "int4, packed",
    "packed-int4-ef": "int4 + error feedback, packed",
    "policy": "channel-aware policy (adapters int8), packed",
}


# ----------------------------------------------------------------------------------------------- configs
def base_config(args: argparse.Namespace, seed: int) -> dict:
    """The cell's config with this table's step budget (or the tiny quick variant)."""
    raw = yaml.safe_load(CELL.read_text())
    raw.update(seed=seed, num_clients=args.clients, output_dir=str(OUT / "runs"))
    raw["data"].update(num_train=args.num_train, num_eval=args.num_eval)
    raw["training"].update(batch_size=args.batch_size, local_steps=args.local_steps)
    raw["rounds"] = {"num_rounds": args.rounds, "deadline_s": 1e6, "eval_every": 1}
    # the server is a GPU (device class gpu-server), as in a cell's edge cloud: with one host core serving
    # every client's steps in turn, the server's queue, not the air, would set the round time
    raw.setdefault("sim", {})["server_device"] = args.server_device
    if args.quick:  # tiny BERT with the MiniLM tokenizer on the same SST-2 text; analytic compute costs
        raw["model"] = {"family": "bert", "tiny": True, "tokenizer": "minilm", "num_labels": 2, "cut": 2}
        raw["lora"] = {"r": 4, "alpha": 8}
        raw["data"]["max_seq_len"] = 32
        raw["sim"]["cost_model"] = "flops"
    return raw


def ladder() -> list[str]:
    return [c for c in ("raw", "fp16", "int8", "int4") if c in CODECS]


def row_config(args: argparse.Namespace, row: str, seed: int) -> tuple[dict | None, str]:
    """(raw config of `row`, note) or (None, why it cannot run on this checkout)."""
    raw = base_config(args, seed)
    keys = set(all_keys())
    tr = raw["training"]
    tr.pop("codec_up", None)
    note = ""
    # a checkout without training.packed runs padded steps: right for the reference, noted for the policy
    optional = {"packed"} if row in ("reference", "policy") else set()
    lacks = [f"training.{k}" for k in ROWS[row] if f"training.{k}" not in keys and k not in optional]
    lacks += [f"codec {c}" for k in ("codec_up", "codec_down") if (c := ROWS[row].get(k)) and c not in CODECS]
    if lacks:
        return None, "needs " + ", ".join(dict.fromkeys(lacks))
    for k, v in ROWS[row].items():
        if k == "packed" and "training.packed" not in keys:
            note = "unpacked: this checkout has no training.packed" if v else ""
            continue
        if k == "codec_policy":
            tr[k] = {"kind": v, "ladder": ladder(), "budget_s": args.budget, "directions": ["up", "down"]}
            continue
        tr[k] = v
    raw["name"] = f"{args.tag}-{row}-s{seed}"
    try:
        parse_config(copy.deepcopy(raw))
    except ConfigError as e:
        return None, " ".join(str(e).split())
    return raw, note


# ----------------------------------------------------------------------------------------------- runs
def training_times(recs: list[dict]) -> list[float]:
    """Simulated time at the end of each round without the global evaluations (bookkeeping, not training:
    the server scores the dev set after every round here, which a deployment would do rarely)."""
    out, evals = [], 0.0
    for r in recs:
        evals += float((r.get("breakdown") or {}).get("evaluation", 0.0))
        out.append(float(r["sim_time_s"]) - evals)
    return out


def reached(recs: list[dict], target: float) -> float | None:
    """Simulated training time (evaluation excluded) at the end of the first round whose evaluation reaches
    `target`."""
    for r, t in zip(recs, training_times(recs)):
        acc = r.get("eval_accuracy")
        if acc is not None and acc >= target:
            return t
    return None


def time_to(run: dict, target: float) -> float | None:
    """Simulated time at which a finished row first reached `target` (from its stored curve, or its run's
    metrics.jsonl for results written before the curve was stored)."""
    times = run.get("sim_time_per_round")
    if times is None:
        path = ROOT / run["run_dir"] / "metrics.jsonl"
        return reached([json.loads(x) for x in path.read_text().splitlines() if x.strip()], target)
    return next((t for a, t in zip(run["accuracy_per_round"], times) if a >= target), None)


def run_row(args: argparse.Namespace, raw: dict) -> dict:
    cfg = parse_config(raw)
    t0 = time.time()
    run = simulate(cfg, progress=False)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    acc = [r["eval_accuracy"] for r in recs if r.get("eval_accuracy") is not None]
    codecs: dict[str, dict[str, int]] = {}
    for r in recs:
        for d, counts in (r.get("codecs") or {}).items():
            for c, n in counts.items():
                codecs.setdefault(d, {})[c] = codecs.get(d, {}).get(c, 0) + n
    steps = sum(codecs.get("up", {}).values()) or cfg.rounds.num_rounds * cfg.num_clients * cfg.training.local_steps
    samples = steps * cfg.training.batch_size
    up, down = sum(r["bytes_up"] for r in recs), sum(r["bytes_down"] for r in recs)
    return {
        "run_dir": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
        "accuracy_per_round": acc,
        "sim_time_per_round": [t for r, t in zip(recs, training_times(recs)) if r.get("eval_accuracy") is not None],
        "final_accuracy": float(np.mean(acc[-4:])),
        "time_to_target_s": reached(recs, args.target),
        "sim_time_s": recs[-1]["sim_time_s"],
        "samples": samples,
        "bytes_up": up,
        "bytes_down": down,
        "up_per_sample": up / samples,
        "down_per_sample": down / samples,
        "codecs": codecs,
        "wall_s": time.time() - t0,
    }


def centralized(args: argparse.Namespace, seed: int) -> dict:
    """Centralized LoRA on the union of the clients' shards with the same steps; dev accuracy at each round's
    worth of steps (as scripts/quality_table.py)."""
    cfg = parse_config(base_config(args, seed))
    split = build_split(cfg)
    split.peft_model.eval()
    data, shards = train_data(cfg, split)
    union = np.sort(np.concatenate(shards))
    dev = build_token_dataset(data_spec(cfg, "eval", int(split.peft_model.config.vocab_size)), tokenizer_source(cfg))
    opt = make_optimizer(cfg, list(trainable_parameters(split.peft_model).values()))
    stream = Batcher(union, cfg.training.batch_size, cfg.seed).stream()
    per_round = cfg.num_clients * cfg.training.local_steps
    acc = []
    t0 = time.time()
    for _ in range(cfg.rounds.num_rounds):
        for _ in range(per_round):
            _, _, idx = next(stream)
            unsplit_step(split, opt, data.batch(idx))
        acc.append(dev_accuracy(split, dev))
    return {"accuracy_per_round": acc, "final_accuracy": float(np.mean(acc[-4:])), "wall_s": time.time() - t0}


# ----------------------------------------------------------------------------------------------- table
def _stat(values: list[float]) -> tuple[float, float]:
    """(mean, half the spread) over the seeds."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def summarize(results: dict, rows: list[str], seeds: list[int], target2: float) -> dict[str, dict]:
    """Per row: mean and spread over the seeds of each column, ratios to the reference row."""
    out: dict[str, dict] = {}
    for row in [*rows, "centralized"]:
        runs = [results.get(f"{row}/s{s}") for s in seeds]
        runs = [r for r in runs if r and "error" not in r and "unavailable" not in r]
        if not runs:
            continue
        s: dict[str, Any] = {"seeds": len(runs), "final_accuracy": _stat([r["final_accuracy"] for r in runs])}
        if row != "centralized":
            s["up_per_sample"] = _stat([r["up_per_sample"] for r in runs])
            s["down_per_sample"] = _stat([r["down_per_sample"] for r in runs])
            times = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
            s["time_to_target_s"] = _stat(times) if times else None
            s["reached"] = len(times)
            times2 = [t for r in runs if (t := time_to(r, target2)) is not None]
            s["time_to_target2_s"] = _stat(times2) if times2 else None
            s["reached2"] = len(times2)
        out[row] = s
    ref = out.get("reference")
    if ref:
        for row, s in out.items():
            if row == "centralized":
                continue
            for k in ("up_per_sample", "down_per_sample"):
                s[f"{k}_ratio"] = s[k][0] / ref[k][0]
            if s.get("time_to_target_s") and ref.get("time_to_target_s"):
                s["time_ratio"] = s["time_to_target_s"][0] / ref["time_to_target_s"][0]
            if s.get("time_to_target2_s") and ref.get("time_to_target2_s"):
                s["time2_ratio"] = s["time_to_target2_s"][0] / ref["time_to_target2_s"][0]
            s["accuracy_delta"] = s["final_accuracy"][0] - ref["final_accuracy"][0]
    return out


def _pm(v: tuple[float, float], fmt: str) -> str:
    return f"{v[0]:{fmt}} ± {v[1]:{fmt}}"


def table(results: dict, summary: dict, args: argparse.Namespace, rows: list[str], seeds: list[int]) -> str:
    what = "tiny BERT (quick)" if args.quick else "all-MiniLM-L6-v2 (cut 3, LoRA r 8)"
    lines = [
        f"{what} on SST-2, {args.clients} clients in the wireless cell of {CELL.relative_to(ROOT)} (simulation "
        f"engine; server device {args.server_device}), {args.rounds} rounds x {args.local_steps} local steps x batch "
        f"{args.batch_size} for every row; "
        f"seeds {', '.join(map(str, seeds))} (mean ± half the spread). Bytes: all training traffic per "
        f"training sample; accuracy: mean of the last 4 dev evaluations; time: simulated training seconds (evaluation excluded) until the dev "
        f"accuracy first reaches {args.target} (and {args.target2}; (k/n): reached in k of n seeds, the mean over "
        f"those). Ratios against the reference row.",
        "",
        f"| row | uplink B/sample | downlink B/sample | final accuracy | time to {args.target} (s) | time to "
        f"{args.target2} (s) | up / ref | down / ref | time {args.target} / ref | time {args.target2} / ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def when(t: tuple[float, float] | None, k: int, n: int) -> str:
        if t is None:
            return "not reached"
        return _pm(t, ".1f") + ("" if k == n else f" ({k}/{n})")

    missing: list[str] = []
    for row in rows:
        s = summary.get(row)
        label = LABELS[row]
        if any(str(results.get(f"{row}/s{x}", {}).get("note", "")).startswith("unpacked") for x in seeds):
            label = label.replace("packed", "unpacked on this checkout")
        if s is None:
            got = [results[f"{row}/s{x}"] for x in seeds if f"{row}/s{x}" in results]
            why = next((r.get("unavailable") or r.get("error") for r in got), None) or "not run"
            missing.append(f"{label}: {why}")
            status = "not run" if not got else "unavailable" if "unavailable" in got[0] else "failed"
            lines.append(f"| {label} | {status} | — | — | — | — | — | — | — | — |")
            continue
        t = when(s["time_to_target_s"], s["reached"], s["seeds"])
        t2 = when(s["time_to_target2_s"], s["reached2"], s["seeds"])
        lines.append(
            f"| {label} | {_pm(s['up_per_sample'], ',.0f')} | {_pm(s['down_per_sample'], ',.0f')} | "
            f"{_pm(s['final_accuracy'], '.4f')} | {t} | {t2} | {s.get('up_per_sample_ratio', float('nan')):.3f} | "
            f"{s.get('down_per_sample_ratio', float('nan')):.3f} | "
            + (f"{s['time_ratio']:.3f}" if "time_ratio" in s else "—")
            + " | "
            + (f"{s['time2_ratio']:.3f}" if "time2_ratio" in s else "—")
            + " |"
        )
    c = summary.get("centralized")
    if c:
        acc = _pm(c["final_accuracy"], ".4f")
        lines.append(f"| centralized LoRA (same steps) | — | — | {acc} | — | — | — | — | — | — |")
    pol = [results.get(f"policy/s{x}") for x in seeds]
    pol = [p for p in pol if p and "codecs" in p]
    if pol:
        mix = {d: {} for d in ("up", "down")}
        for p in pol:
            for d, counts in p["codecs"].items():
                for k, n in counts.items():
                    mix[d][k] = mix[d].get(k, 0) + n
        lines += [
            "",
            f"Policy steps per codec (all seeds, budget {args.budget} s per step and direction): "
            + "; ".join(f"{d}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())) for d, c in mix.items() if c),
        ]
    notes = sorted({r["note"] for r in results.values() if isinstance(r, dict) and r.get("note")})
    if notes:
        lines += ["", *[f"Note: {n}." for n in notes]]
    if missing:
        lines += ["", "Rows without results:", *[f"- {m}" for m in missing]]
    return "\n".join(lines) + "\n"


def plot(summary: dict, rows: list[str], path: Path, target: float, target2: float) -> None:
    import matplotlib  # imported here: only the figure needs it, and only after every run is done

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r in summary]
    if not done:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        s = summary[r]
        ax1.errorbar(
            s["up_per_sample"][0],
            s["final_accuracy"][0],
            xerr=s["up_per_sample"][1],
            yerr=s["final_accuracy"][1],
            fmt="o",
            capsize=3,
            label=LABELS[r],
        )
    if "centralized" in summary:
        ax1.axhline(summary["centralized"]["final_accuracy"][0], color="grey", ls="--", label="centralized LoRA")
    ax1.set_xscale("log")
    ax1.set_xlabel("uplink bytes per training sample")
    ax1.set_ylabel("final dev accuracy (mean of last 4)")
    ax1.legend(fontsize=7)
    y = np.arange(len(done))
    for off, key, tgt, color in ((-0.2, "time_to_target2_s", target2, "C1"), (0.2, "time_to_target_s", target, "C0")):
        times = [summary[r].get(key) for r in done]
        ax2.barh(
            y + off,
            [t[0] if t else 0 for t in times],
            height=0.4,
            xerr=[t[1] if t else 0 for t in times],
            color=color,
            label=f"to {tgt}",
        )
        for i, t in enumerate(times):
            if t is None:
                ax2.text(0, i + off, f" {tgt} not reached", va="center", fontsize=7)
    ax2.set_yticks(y, [LABELS[r] for r in done], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("simulated seconds to the dev accuracy")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--quick", action="store_true", help="tiny BERT, 2 clients, 2 rounds of 2 steps: a smoke test")
    ap.add_argument("--rounds", type=int, default=None, help="default 12 (quick: 2)")
    ap.add_argument("--clients", type=int, default=None, help="default 8 (quick: 2)")
    ap.add_argument("--local-steps", type=int, default=None, help="default 8 (quick: 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-train", type=int, default=None, help="default 8000 (quick: 128)")
    ap.add_argument("--num-eval", type=int, default=None, help="default: the whole dev set (872; quick: 64)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="the policy's seconds per step and direction (default 0.15; quick 0.02)",
    )
    ap.add_argument("--server-device", default="gpu-server", help="sim.server_device (default gpu-server)")
    ap.add_argument("--target", type=float, default=0.82, help="dev accuracy the time column waits for")
    ap.add_argument("--target2", type=float, default=0.80, help="a second accuracy the table times (default 0.80)")
    ap.add_argument("--skip-centralized", action="store_true")
    ap.add_argument(
        "--summarize-only",
        action="store_true",
        help="no runs: rebuild the table, JSON and plot from results/codecs/TAG.json",
    )
    ap.add_argument("--tag", default=None, help="result file names under results/codecs/ (default: codecs, quick)")
    args = ap.parse_args()
    q = args.quick
    for name, full, quick in (("rounds", 12, 2), ("clients", 8, 2), ("local_steps", 8, 2), ("num_train", 8000, 128)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.budget is None:  # quick: tiny activations, so a tight budget that makes the policy switch
        args.budget = 0.02 if q else 0.15
    if args.num_eval is None and q:
        args.num_eval = 64
    if q and args.batch_size == 16:
        args.batch_size = 8
    args.tag = args.tag or ("quick" if q else "codecs")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.tag}.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}

    def save() -> None:
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    for seed in [] if args.summarize_only else args.seeds:
        if not args.skip_centralized:
            results[f"centralized/s{seed}"] = centralized(args, seed)
            save()
        for row in args.rows:
            key = f"{row}/s{seed}"
            raw, note = row_config(args, row, seed)
            if raw is None:
                log.warning("%s: unavailable on this checkout: %s", key, note)
                results[key] = {"unavailable": note}
                continue
            try:
                results[key] = {**run_row(args, raw), "note": note}
            except Exception as err:  # keep the table going; the failure is recorded, not hidden
                log.exception("%s failed", key)
                results[key] = {"error": f"{type(err).__name__}: {err}"}
            log.info("%s: %s", key, {k: results[key].get(k) for k in ("final_accuracy", "time_to_target_s", "error")})
            save()
    summary = summarize(results, args.rows, args.seeds, args.target2)
    md = table(results, summary, args, args.rows, args.seeds)
    (OUT / f"{args.tag}.md").write_text(md)
    path.write_text(json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=2))
    try:
        plot(summary, args.rows, OUT / f"{args.tag}.png", args.target, args.target2)
    except Exception:  # a figure must not lose the numbers
        log.exception("plot failed")
    print(md)


if __name__ == "__main__":
    main()
