"""Split training over loopback gRPC vs centralized peft LoRA, side by side in one run.

MiniLM (all-MiniLM-L6-v2) cut at block 2, batch 16, real SST-2 batches: one `splitwave server` process and
one torch-free `splitwave edge` process, against the unsplit peft model trained in this process on the same
batches; the two alternate `--repeats` times (each ratio is of a pair measured back to back). Prints
samples/s of each and their ratio, wire bytes / raw tensor bytes per step, and the bytes of
each codec on real activations. Writes benchmarks/results/split_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from splitwave.common.batching import Batcher
from splitwave.common.config import parse_config
from splitwave.common.shard import round_batch
from splitwave.edge.runtime import EdgeRuntime
from splitwave.launch import ProcessGroup, child_env
from splitwave.protos.codec import encode, wire_size
from splitwave.server.reference import make_optimizer, train_data, unsplit_step
from splitwave.server.setup import build_split
from splitwave.server.trainer import trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/split_throughput.json"


def config(steps: int, edge_mode: str) -> dict:
    return {
        "name": "throughput",
        "num_clients": 1,
        "seed": 0,
        "model": {"family": "minilm", "tiny": False, "cut": 2},
        "lora": {"r": 8, "alpha": 16},
        "data": {"dataset": "sst2", "num_train": 16 * steps, "num_eval": 64, "max_seq_len": 64},
        "training": {
            "mode": "sfl-v2",
            "batch_size": 16,
            "local_steps": steps,
            "edge_mode": edge_mode,
            "optim": {"lr": 1e-4},
        },
        "rounds": {"num_rounds": 1, "deadline_s": 900},
        "aggregation": {"strategy": "fedit"},
    }


def split_run(raw: dict, tmp: Path) -> list[dict]:
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp / "server"
    # both sides get the 2 cores: with one client, edge and server compute in turn, never at once
    with ProcessGroup(cwd=ROOT, env=child_env(omp_threads=1)) as procs:
        procs.start_server(
            cfg_path,
            run_dir=run,
            cache_dir=ROOT / ".cache" / "bundles",
            ready_file=run / "ready.json",
            log=run / "server.log",
            extra=["--threads", "2"],
        )
        port = procs.wait_ready("server", run / "ready.json", timeout=600)
        procs.start_edge(
            "edge0",
            f"127.0.0.1:{port}",
            cache_dir=tmp / "cache",
            metrics=tmp / "edge0.jsonl",
            log=tmp / "edge0.log",
            extra=["--threads", "2"],
        )
        procs.wait_exit(["edge0"], timeout=900)
    return [
        json.loads(line)
        for line in (tmp / "edge0.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]


def centralized_times(raw: dict) -> list[float]:
    cfg = parse_config(raw)
    split = build_split(cfg)
    split.peft_model.eval()
    data, shards = train_data(cfg, split)
    opt = make_optimizer(cfg, list(trainable_parameters(split.peft_model).values()))
    batcher = Batcher(shards[0], cfg.training.batch_size, cfg.seed, client_id=0)
    times = []
    for s in range(cfg.training.local_steps):
        batch = round_batch(data, batcher, cfg.training.local_steps, 0, s)
        t0 = time.perf_counter()
        unsplit_step(split, opt, batch)
        times.append(time.perf_counter() - t0)
    return times


def torch_bottom_times(raw: dict) -> list[float]:
    """torch doing the edge's part (embeddings + blocks below the cut, forward + backward to the LoRA factors)
    on the same batches and gradients: what the ORT edge is set against."""
    cfg = parse_config(raw)
    split = build_split(cfg)
    split.peft_model.eval()
    data, shards = train_data(cfg, split)
    batcher = Batcher(shards[0], cfg.training.batch_size, cfg.seed, client_id=0)
    factors = list(split.edge_factor_params().values())
    times = []
    for s in range(cfg.training.local_steps):
        ids, mask, _ = round_batch(data, batcher, cfg.training.local_steps, 0, s)
        t0 = time.perf_counter()
        h = split.edge(torch.from_numpy(ids), torch.from_numpy(mask))
        torch.autograd.grad(h, factors, torch.ones_like(h))  # the cost does not depend on the values
        times.append(time.perf_counter() - t0)
    return times


def codec_table(raw: dict, cache: Path) -> dict:
    """Serialized bytes of each codec for real MiniLM cut-2 activations of one SST-2 batch."""
    bundle = next(p for p in cache.iterdir() if (p / "manifest.json").exists())
    rt = EdgeRuntime(bundle, mode="recompute")
    cfg = parse_config(raw)
    data, shards = train_data(cfg, build_split(cfg))
    ids, mask, _ = data.batch(shards[0][:16])
    h = rt.forward(ids, mask)
    raw_bytes = h.nbytes
    out = {"shape": list(h.shape), "raw_tensor_bytes": raw_bytes}
    for codec in ("raw", "fp16", "bf16", "int8", "topk"):
        w = wire_size(encode("h", h, codec, topk_fraction=0.1))
        out[codec] = {"wire_bytes": w, "wire_over_raw": w / raw_bytes, "reduction": raw_bytes / w}
    return out


def breakdown(run: dict) -> dict:
    """Per-step means of one repeat: centralized vs the split step's parts, and the compute-only ratio."""
    steps = run["steps"]
    n = len(steps)
    mean = lambda key: sum(s[key] for s in steps) / n  # noqa: E731
    edge, server = mean("edge_fwd_s") + mean("edge_bwd_s"), mean("server_s")
    central, bottom = sum(run["central"]) / n, sum(run["bottom"]) / n
    return {
        "centralized_ms": 1e3 * central,
        "ort_edge_ms": 1e3 * edge,
        "server_ms": 1e3 * server,
        "transport_ms": 1e3 * (mean("roundtrip_s") - server),
        "edge_encode_and_rest_ms": 1e3
        * (mean("step_s") - mean("edge_fwd_s") - mean("roundtrip_s") - mean("edge_bwd_s")),
        "torch_bottom_ms": 1e3 * bottom,
        "ratio_without_transport": central / (edge + server),
        "ort_edge_over_torch_bottom": edge / bottom,
        "server_over_centralized_minus_bottom": server / (central - bottom),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternating split / centralized measurements")
    ap.add_argument("--edge-mode", default="saved", choices=["saved", "recompute"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    raw = config(args.steps, args.edge_mode)
    runs = []  # this machine drifts: alternate the two and compare each pair measured back to back
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            tmp = Path(d) / f"rep{rep}"
            tmp.mkdir()
            steps = split_run(raw, tmp)[args.warmup :]
            central = centralized_times(raw)[args.warmup :]
            bottom = torch_bottom_times(raw)[args.warmup :]
            samples = sum(s["batch"] for s in steps)
            split_s = sum(s["step_s"] for s in steps)  # wall time of the step on the edge, encoding included
            runs.append(
                {
                    "steps": steps,
                    "split_samples_per_s": samples / split_s,
                    "centralized_samples_per_s": samples / sum(central),
                    "central": central,
                    "bottom": bottom,
                }
            )
            print(
                f"repeat {rep}: split {runs[-1]['split_samples_per_s']:.1f} samples/s, centralized "
                f"{runs[-1]['centralized_samples_per_s']:.1f}: "
                f"{runs[-1]['split_samples_per_s'] / runs[-1]['centralized_samples_per_s']:.3f}x",
                flush=True,
            )
        codecs = codec_table(raw, Path(d) / "rep0" / "cache")
    steps = [s for r in runs for s in r["steps"]]
    central = [t for r in runs for t in r["central"]]
    ratios = [r["split_samples_per_s"] / r["centralized_samples_per_s"] for r in runs]
    # where the gap comes from: per repeat (a pair measured back to back), then the median over the repeats
    gaps = [breakdown(r) for r in runs]
    gap = {k: statistics.median(g[k] for g in gaps) for k in gaps[0]}
    sps_split = statistics.median(r["split_samples_per_s"] for r in runs)
    sps_central = statistics.median(r["centralized_samples_per_s"] for r in runs)
    # raw tensor bytes of a step: h (fp32) + attention_mask (int64) + labels (int64)
    raw_step = [s["batch"] * s["seq"] * (384 * 4 + 8) + s["batch"] * 8 for s in steps]
    wire_up = [s["bytes_up"] for s in steps]
    result = {
        "config": raw,
        "measured_steps": len(steps),
        "repeats": args.repeats,
        "split_samples_per_s": sps_split,
        "centralized_samples_per_s": sps_central,
        "ratio_split_over_centralized": statistics.median(ratios),
        "ratio_each_repeat": ratios,
        "split_step_ms_median": 1e3 * statistics.median(s["step_s"] for s in steps),
        "split_breakdown_ms_median": {
            k: 1e3 * statistics.median(s[k] for s in steps)
            for k in ("edge_fwd_s", "roundtrip_s", "server_s", "edge_bwd_s")
        },
        "centralized_step_ms_median": 1e3 * statistics.median(central),
        "uplink_wire_over_raw_fp32": sum(wire_up) / sum(raw_step),
        "codecs_on_real_activations": codecs,
        "breakdown_median": gap,
        "breakdown_each_repeat": gaps,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(
        f"split over gRPC : {sps_split:8.1f} samples/s  (median step {result['split_step_ms_median']:.1f} ms: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["split_breakdown_ms_median"].items())
        + ")"
    )
    print(
        f"centralized LoRA: {sps_central:8.1f} samples/s  (median step {result['centralized_step_ms_median']:.1f} ms)"
    )
    print(
        f"ratio split / centralized: {result['ratio_split_over_centralized']:.3f}x median of "
        f"{', '.join(f'{r:.3f}' for r in ratios)}   (target >= 0.9)"
    )
    print(
        f"per step (means; median over repeats): centralized {gap['centralized_ms']:.1f} ms; split = ORT edge "
        f"{gap['ort_edge_ms']:.1f} + server {gap['server_ms']:.1f} + transport {gap['transport_ms']:.1f} + edge "
        f"encoding etc. {gap['edge_encode_and_rest_ms']:.1f} ms"
    )
    each = ", ".join(f"{g['ratio_without_transport']:.3f}" for g in gaps)
    print(
        f"  compute alone (no transport): {gap['ratio_without_transport']:.3f}x (repeats {each}); ORT edge / torch doing the "
        f"same part ({gap['torch_bottom_ms']:.1f} ms) = {gap['ort_edge_over_torch_bottom']:.2f}; server / its "
        f"share of the centralized step = {gap['server_over_centralized_minus_bottom']:.2f}"
    )
    print(
        f"uplink wire bytes / raw tensor bytes (fp32, h + mask + labels): {result['uplink_wire_over_raw_fp32']:.4f}"
        "   (target <= 1.02)"
    )
    for c in ("raw", "fp16", "bf16", "int8", "topk"):
        print(
            f"  codec {c:5s}: {codecs[c]['wire_bytes']:9d} B on the wire, {codecs[c]['reduction']:.2f}x smaller than raw fp32"
        )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
