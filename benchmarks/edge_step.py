"""One full edge training step (forward -> h, LoRA grads, AdamW) on the real all-MiniLM-L6-v2 bottom.

ORT recompute mode, ORT saved mode and torch eager side by side, each measured in a fresh subprocess
(median of --runs steps after warm-up; peak RSS via getrusage). Prints a table and writes
benchmarks/results/edge_step.json.

    .venv/bin/python benchmarks/edge_step.py [--cut 2 --batch 16 --seq 64 --runs 15 --threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker(args) -> None:
    """Runs in a fresh process: one backend, timings + memory + first-step grads."""
    data = np.load(args.data)
    ids, mask, gh = data["input_ids"], data["attention_mask"], data["grad_h"]
    factors = {k[len("f:"):]: data[k] for k in data.files if k.startswith("f:")}
    if args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
        from edge.torch_backend import TorchEdge
        from server.models import build_model, minilm_path
        from server.split import LoraSpec, split_model

        split = split_model(build_model(minilm_path(), "seq-cls"), args.cut, LoraSpec(r=args.r, alpha=2 * args.r), "seq-cls")
        backend = TorchEdge(split)
    else:
        from edge.runtime import EdgeRuntime

        backend = EdgeRuntime(args.bundle, mode=args.worker, threads=args.threads, opt_level=args.opt_level)
    backend.set_factors(factors)
    rss_setup = _rss_now_kb()
    first = None
    times = []
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        h = backend.forward(ids, mask)
        grads = backend.backward(gh)
        backend.step(grads)
        dt = time.perf_counter() - t0
        if first is None:
            first = {"h": h, **{"g:" + k: v for k, v in grads.items()}}
        if i >= args.warmup:
            times.append(dt)
    peak = _peak_rss_kb()  # VmHWM: ru_maxrss would carry the parent's high-water mark across exec
    np.savez(args.out, **first)
    print(json.dumps({"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                      "rss_setup_mb": rss_setup / 1024, "peak_rss_mb": peak / 1024,
                      "step_peak_delta_mb": (peak - rss_setup) / 1024}))


def _prepare(args, cache: Path) -> tuple[Path, Path, float | None]:
    """Export (or reuse) the MiniLM cut bundle; write the batch + factors every backend uses."""
    import torch

    from server.export import export_bundle
    from server.models import build_model, minilm_path
    from server.split import LoraSpec, split_model

    key = hashlib.sha256(f"minilm|cut={args.cut}|r={args.r}|v2".encode()).hexdigest()[:12]
    bundle = cache / f"minilm-{key}"
    split = split_model(build_model(minilm_path(), "seq-cls"), args.cut, LoraSpec(r=args.r, alpha=2 * args.r), "seq-cls")
    g = torch.Generator().manual_seed(0)
    factors = {k: (0.05 * torch.randn(v.shape, generator=g)).numpy() for k, v in split.edge_factors().items()}
    export_s = None
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        export_bundle(split, bundle, model_id="sentence-transformers/all-MiniLM-L6-v2", tokenizer_dir=minilm_path(),
                      trace_shape=(3, 11))
        export_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(args.batch, args.seq)).astype(np.int64)
    mask = np.ones_like(ids)
    lengths = rng.integers(args.seq // 4, args.seq + 1, size=args.batch)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
        ids[i, n:] = 0
    gh = rng.standard_normal((args.batch, args.seq, split.peft_model.base_model.model.config.hidden_size)).astype(np.float32)
    data = cache / f"edge_step_data_{args.batch}x{args.seq}.npz"
    np.savez(data, input_ids=ids, attention_mask=mask, grad_h=gh, **{"f:" + k: v for k, v in factors.items()})
    return bundle, data, export_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--opt-level", default="all")
    ap.add_argument("--worker", choices=["torch", "recompute", "saved"])
    ap.add_argument("--bundle")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "edge_step.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        _worker(args)
        return
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    bundle, data, export_s = _prepare(args, cache)
    res = {}
    for backend in ("torch", "recompute", "saved"):
        out = cache / f"first_{backend}.npz"
        cmd = [sys.executable, __file__, "--worker", backend, "--bundle", str(bundle), "--data", str(data), "--out", str(out),
               "--cut", str(args.cut), "--r", str(args.r), "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--opt-level", args.opt_level]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if p.returncode != 0:
            raise SystemExit(f"{backend} worker failed:\n{p.stderr[-4000:]}")
        res[backend] = json.loads(p.stdout.strip().splitlines()[-1])
        res[backend]["first"] = out
    ref = np.load(res["torch"].pop("first"))
    for backend in ("recompute", "saved"):
        got = np.load(res[backend].pop("first"))
        gkeys = [k for k in ref.files if k.startswith("g:")]
        abs_err = max(float(np.abs(got[k] - ref[k]).max()) for k in gkeys)
        rel_err = max(float(np.abs(got[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-12)) for k in gkeys)
        res[backend].update({
            "speedup_vs_torch": res["torch"]["median_ms"] / res[backend]["median_ms"],
            "step_mem_ratio_vs_torch": res[backend]["step_peak_delta_mb"] / max(res["torch"]["step_peak_delta_mb"], 1e-9),
            "peak_rss_ratio_vs_torch": res[backend]["peak_rss_mb"] / res["torch"]["peak_rss_mb"],
            "grad_max_abs_err": abs_err, "grad_max_rel_err": rel_err,
            "h_max_abs_err": float(np.abs(got["h"] - ref["h"]).max()),
        })
    manifest = json.loads((bundle / "manifest.json").read_text())
    result = {"model": "all-MiniLM-L6-v2", "cut": args.cut, "lora_r": args.r, "batch": args.batch, "seq": args.seq,
              "runs": args.runs, "threads": args.threads, "opt_level": args.opt_level, "backends": res,
              "export_seconds": export_s if export_s is not None else manifest.get("export_seconds", {}).get("total"),
              "export_breakdown_s": manifest.get("export_seconds"),
              "bundle_bytes": {p.name: p.stat().st_size for p in sorted(bundle.iterdir())}}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(f"edge step, all-MiniLM-L6-v2 cut {args.cut}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"median of {args.runs}")
    print(f"{'backend':<10} {'median ms':>10} {'speedup':>8} {'step peak MB':>13} {'mem ratio':>9} {'peak RSS MB':>12} "
          f"{'grad abs err':>12} {'grad rel err':>12}")
    for b, r in res.items():
        print(f"{b:<10} {r['median_ms']:>10.1f} {r.get('speedup_vs_torch', 1.0):>7.2f}x {r['step_peak_delta_mb']:>13.1f} "
              f"{r.get('step_mem_ratio_vs_torch', 1.0):>9.2f} {r['peak_rss_mb']:>12.1f} "
              f"{r.get('grad_max_abs_err', 0.0):>12.2e} {r.get('grad_max_rel_err', 0.0):>12.2e}")
    print(f"result: {args.result}")


if __name__ == "__main__":
    main()
