"""One full edge training step (forward -> h, LoRA grads, AdamW) on the real all-MiniLM-L6-v2 bottom (or
SmolLM2-135M's with --model smollm2).

ORT recompute mode, ORT saved mode, ORT saved mode on the int8 bundle (edge.quantize: int8, `int8`) and torch
eager side by side, each measured in a fresh subprocess; --backends picks some of them.
The backends alternate over --rounds rounds (torch, recompute, saved, int8, torch, ...) so that load from other
processes on the shared cores hits all of them alike; the step times of all rounds are pooled (median and
min reported). Memory, per worker: `peak_rss_mb` (VmHWM over the whole process), `step_peak_delta_mb`
(VmHWM minus RSS before the first step: includes first-step lazy loads and warm-up), and the steady-state
`step_peak_mb` (VmHWM of the measured steps only, reset after warm-up via /proc/self/clear_refs, minus
the same RSS before the first step: excludes one-off first-step spikes, includes what arenas retain).
Under outside load torch's OpenMP threads degrade far more than ORT's non-spinning ones, so the pooled
median mixes speed with load tolerance: per-round medians and each backend's best round are printed too.
The int8 rows compare with torch (speedup), with fp32 saved mode (`vs saved`) and give the grad/h errors
against torch fp32; `bundle_bytes` lists both bundles' files.
Prints a table and writes benchmarks/results/edge_step.json (edge_step_smollm2.json for --model smollm2).

    .venv/bin/python benchmarks/edge_step.py [--cut 2 --batch 16 --seq 64 --runs 15 --rounds 3 --threads 2]
    .venv/bin/python benchmarks/edge_step.py --model smollm2 --batch 8 --seq 96
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from splitwave.common.manifest import BundleManifest  # noqa: E402


def _rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profile_worker(args) -> None:
    """Runs in a fresh process: ORT's per-node profile of --runs steps of one ORT backend. Each node's time is
    its minimum over the steps (load from other processes only adds), summed per op type, per graph."""
    import collections

    import splitwave.edge.runtime as rt_module
    from splitwave.edge.runtime import EdgeRuntime

    data = np.load(args.data)
    ids, mask, gh = data["input_ids"], data["attention_mask"], data["grad_h"]
    plain = rt_module.session_options

    def profiled(*a, **kw):
        so = plain(*a, **kw)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(args.out).with_suffix("")) + "-ort"
        return so

    rt_module.session_options = profiled
    rt = EdgeRuntime(
        args.bundle,
        mode="saved" if args.worker == "int8" else args.worker,
        threads=args.threads,
        opt_level=args.opt_level,
    )
    rt.set_factors({k[len("f:") :]: data[k] for k in data.files if k.startswith("f:")})
    for _ in range(args.warmup + args.runs):
        rt.forward(ids, mask)
        rt.backward(gh)
    out = {}
    for label, sess in (("forward", rt._fwd), ("backward", rt._bwd)):
        trace = Path(sess.end_profiling())
        per_node, op_of = collections.defaultdict(list), {}
        for e in json.loads(trace.read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node[e["name"]].append(e["dur"])
                op_of[e["name"]] = e["args"]["op_name"]
        by_op: dict[str, float] = collections.defaultdict(float)
        for node, durs in per_node.items():
            by_op[op_of[node]] += min(durs[args.warmup :] or durs) / 1e3
        out[label] = dict(sorted(((k, round(v, 3)) for k, v in by_op.items()), key=lambda kv: -kv[1]))
        trace.unlink()
    print(json.dumps(out))


# The project imports of this file stay inside the functions: the same file is the worker of each backend,
# and a worker measures its memory, so the ORT workers must never load torch (nor the torch worker ORT).
def _worker(args) -> None:
    """Runs in a fresh process: one backend, timings + memory + first-step grads."""
    data = np.load(args.data)
    ids, mask, gh = data["input_ids"], data["attention_mask"], data["grad_h"]
    factors = {k[len("f:") :]: data[k] for k in data.files if k.startswith("f:")}
    if args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
        from splitwave.server.torch_edge import TorchEdge

        backend = TorchEdge(_split(args))
    else:
        from splitwave.edge.runtime import EdgeRuntime

        backend = EdgeRuntime(
            args.bundle,
            mode="saved" if args.worker == "int8" else args.worker,
            threads=args.threads,
            opt_level=args.opt_level,
            spinning=not args.no_spin,
            low_memory=not args.arena,
        )
    backend.set_factors(factors)
    rss_setup = _rss_now_kb()
    first = None
    times, t_fwd, t_bwd, t_opt, cpu = [], [], [], [], []
    reset_ok, peak_warm = False, None
    for i in range(args.warmup + args.runs):
        if i == args.warmup:
            peak_warm = _peak_rss_kb()
            reset_ok = _reset_peak_rss()
        c0 = time.process_time()
        t0 = time.perf_counter()
        h = backend.forward(ids, mask)
        t1 = time.perf_counter()
        grads = backend.backward(gh)
        t2 = time.perf_counter()
        backend.step(grads)
        t3 = time.perf_counter()
        c3 = time.process_time()
        if first is None:
            first = {"h": h, **{"g:" + k: v for k, v in grads.items()}}
        if i >= args.warmup:
            times.append(t3 - t0)
            cpu.append(c3 - c0)
            t_fwd.append(t1 - t0)
            t_bwd.append(t2 - t1)
            t_opt.append(t3 - t2)
    peak_steps = _peak_rss_kb()  # VmHWM: ru_maxrss would carry the parent's high-water mark across exec
    peak = max(peak_steps, peak_warm or 0)
    np.savez(args.out, **first)
    print(
        json.dumps(
            {
                "times_ms": [1000 * t for t in times],
                "cpu_ms": [1000 * t for t in cpu],
                "fwd_ms": 1000 * statistics.median(t_fwd),
                "bwd_ms": 1000 * statistics.median(t_bwd),
                "opt_ms": 1000 * statistics.median(t_opt),
                "rss_setup_mb": rss_setup / 1024,
                "peak_rss_mb": peak / 1024,
                "step_peak_delta_mb": (peak - rss_setup) / 1024,
                "step_peak_mb": (peak_steps - rss_setup) / 1024 if reset_ok else None,
            }
        )
    )


MODELS = {  # --model: (task, model id in the manifest, a token id range of ordinary words)
    "minilm": ("seq-cls", "sentence-transformers/all-MiniLM-L6-v2", (1000, 30000)),
    "smollm2": ("causal-lm", "HuggingFaceTB/SmolLM2-135M-Instruct", (1000, 48000)),
}


def _split(args):
    """The model's split at --cut with LoRA r (what the torch worker trains and the bundles are exported from)."""
    from splitwave.server.models import build_model
    from splitwave.server.pretrained import PRETRAINED
    from splitwave.server.split import LoraSpec, split_model

    task = MODELS[args.model][0]
    return split_model(
        build_model(PRETRAINED[args.model](), task), args.cut, LoraSpec(r=args.r, alpha=2 * args.r), task
    )


def _prepare(args, cache: Path) -> tuple[dict[str, Path], Path, float | None]:
    """Export (or reuse) the model's cut bundle and its int8 version; write the batch + factors every backend uses."""
    import torch

    from splitwave.server.pretrained import PRETRAINED
    from splitwave.server.setup import bundle_dir, cached_bundle

    # the exporter's (and the quantizer's) code is in the key too
    ident = {"model": args.model, "cut": args.cut, "r": args.r, "v": 2}
    split = _split(args)
    g = torch.Generator().manual_seed(0)
    factors = {k: (0.05 * torch.randn(v.shape, generator=g)).numpy() for k, v in split.edge_factors().items()}
    fresh = not (bundle_dir(cache, ident, args.model) / "manifest.json").is_file()
    t0 = time.perf_counter()
    export = dict(model_id=MODELS[args.model][1], tokenizer_dir=PRETRAINED[args.model](), trace_shape=(3, 11))
    bundles = {"fp32": cached_bundle(cache, ident, split, label=args.model, **export)}
    export_s = time.perf_counter() - t0 if fresh else None
    if "int8" in args.backends:
        bundles["int8"] = cached_bundle(cache, ident, split, label=args.model, quantize="int8", **export)
    rng = np.random.default_rng(0)
    lo, hi = MODELS[args.model][2]
    ids = rng.integers(lo, hi, size=(args.batch, args.seq)).astype(np.int64)
    mask = np.ones_like(ids)
    lengths = rng.integers(args.seq // 4, args.seq + 1, size=args.batch)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
        ids[i, n:] = 0
    gh = rng.standard_normal((args.batch, args.seq, split.peft_model.base_model.model.config.hidden_size)).astype(
        np.float32
    )
    data = cache / f"edge_step_data_{args.model}_{args.batch}x{args.seq}.npz"
    np.savez(data, input_ids=ids, attention_mask=mask, grad_h=gh, **{"f:" + k: v for k, v in factors.items()})
    return bundles, data, export_s


def _spawn(args, backend: str, bundles: dict, data: Path, out: Path, extra: list[str], what: str):
    """Run one backend in its own process (so each measures its own memory); its finished process."""
    cmd = [sys.executable, __file__, "--worker", backend, *extra]
    cmd += ["--bundle", str(bundles["int8" if backend == "int8" else "fp32"]), "--model", args.model]
    cmd += ["--data", str(data), "--out", str(out), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads), "--opt-level", args.opt_level]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{backend} {what} failed:\n{p.stderr[-4000:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument(
        "--backends", default="torch,recompute,saved,int8", help="comma-separated: torch, recompute, saved, int8"
    )
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--runs", type=int, default=15, help="measured steps per worker (per round)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of all backends")
    ap.add_argument(
        "--no-spin",
        action="store_true",
        help="ORT workers sleep between kernels (default: spin while a run is in progress)",
    )
    ap.add_argument(
        "--arena", action="store_true", help="ORT defaults: one arena per session + memory patterns (low_memory=False)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--opt-level", default="all")
    ap.add_argument("--worker", choices=["torch", "recompute", "saved", "int8"])
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile each ORT backend (per op type, each node's minimum over the steps) into the result",
    )
    ap.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--result", help="default: benchmarks/results/edge_step.json (edge_step_<model>.json)")
    args = ap.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = set(args.backends) - {"torch", "recompute", "saved", "int8"}
    if bad or "torch" not in args.backends:
        raise SystemExit(f"--backends: torch (the reference) plus any of recompute, saved, int8; got {args.backends}")
    if args.result is None:
        name = "edge_step.json" if args.model == "minilm" else f"edge_step_{args.model}.json"
        args.result = str(ROOT / "benchmarks" / "results" / name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        (_profile_worker if args.profile_worker else _worker)(args)
        return
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    bundles, data, export_s = _prepare(args, cache)
    backends = tuple(args.backends)
    per_round: dict[str, list[dict]] = {b: [] for b in backends}
    for _rnd in range(args.rounds):
        for backend in backends:
            out = cache / f"first_{backend}.npz"
            extra = ["--cut", str(args.cut), "--r", str(args.r)]
            extra += [*(["--no-spin"] if args.no_spin else []), *(["--arena"] if args.arena else [])]
            p = _spawn(args, backend, bundles, data, out, extra, "worker")
            per_round[backend].append(json.loads(p.stdout.strip().splitlines()[-1]))
    profiles = {}
    for backend in backends[1:] if args.profile else ():
        out = cache / f"profile_{backend}.json"
        p = _spawn(args, backend, bundles, data, out, ["--profile-worker"], "profile worker")
        profiles[backend] = json.loads(p.stdout.strip().splitlines()[-1])
    res = {}
    for backend, rounds in per_round.items():
        times = [t for r in rounds for t in r["times_ms"]]

        def med(key, rounds=rounds):
            vals = [r[key] for r in rounds if r[key] is not None]
            return statistics.median(vals) if vals else None

        res[backend] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "round_medians_ms": [statistics.median(r["times_ms"]) for r in rounds],
            # CPU seconds of the worker per step: with --threads 1 the work of a step without the time other
            # processes held the core (the load-robust figure; with more threads it counts spinning too)
            "cpu_median_ms": statistics.median([t for r in rounds for t in r["cpu_ms"]]),
            **{
                k: med(k)
                for k in (
                    "fwd_ms",
                    "bwd_ms",
                    "opt_ms",
                    "rss_setup_mb",
                    "peak_rss_mb",
                    "step_peak_delta_mb",
                    "step_peak_mb",
                )
            },
            "first": cache / f"first_{backend}.npz",
        }
        if backend in profiles:
            res[backend]["profile_ms"] = profiles[backend]
    ref = np.load(res["torch"].pop("first"))
    for backend in backends[1:]:
        got = np.load(res[backend].pop("first"))
        gkeys = [k for k in ref.files if k.startswith("g:")]
        abs_err = max(float(np.abs(got[k] - ref[k]).max()) for k in gkeys)
        rel_err = max(float(np.abs(got[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-12)) for k in gkeys)
        res[backend].update(
            {
                "speedup_vs_torch": res["torch"]["median_ms"] / res[backend]["median_ms"],
                "cpu_speedup_vs_torch": res["torch"]["cpu_median_ms"] / res[backend]["cpu_median_ms"],
                "min_speedup_vs_torch": res["torch"]["min_ms"] / res[backend]["min_ms"],
                # per round (the backends of one round ran back to back, under about the same outside load)
                "round_speedups": [
                    t / o for t, o in zip(res["torch"]["round_medians_ms"], res[backend]["round_medians_ms"])
                ],
                # each backend's least disturbed round (outside load comes and goes within a round, too)
                "best_round_speedup": min(res["torch"]["round_medians_ms"]) / min(res[backend]["round_medians_ms"]),
                "step_mem_ratio_vs_torch": res[backend]["step_peak_delta_mb"]
                / max(res["torch"]["step_peak_delta_mb"], 1e-9),
                "steady_step_mem_ratio_vs_torch": (
                    res[backend]["step_peak_mb"] / max(res["torch"]["step_peak_mb"], 1e-9)
                    if res[backend]["step_peak_mb"] is not None and res["torch"]["step_peak_mb"] is not None
                    else None
                ),
                "peak_rss_ratio_vs_torch": res[backend]["peak_rss_mb"] / res["torch"]["peak_rss_mb"],
                "grad_max_abs_err": abs_err,
                "grad_max_rel_err": rel_err,
                "h_max_abs_err": float(np.abs(got["h"] - ref["h"]).max()),
                # relative Frobenius errors against torch fp32 (the int8 bundle's quantization error)
                "h_rel_err": float(np.linalg.norm(got["h"] - ref["h"]) / np.linalg.norm(ref["h"])),
                "grad_max_fro_rel_err": max(
                    float(np.linalg.norm(got[k] - ref[k]) / (np.linalg.norm(ref[k]) + 1e-12)) for k in gkeys
                ),
            }
        )
    if "int8" in res and "saved" in res:  # int8 against the fp32 ORT saved mode, the same graphs in fp32
        r8, r32 = res["int8"], res["saved"]
        r8["speedup_vs_saved"] = r32["median_ms"] / r8["median_ms"]
        r8["cpu_speedup_vs_saved"] = r32["cpu_median_ms"] / r8["cpu_median_ms"]
        r8["round_speedups_vs_saved"] = [s / q for s, q in zip(r32["round_medians_ms"], r8["round_medians_ms"])]
        r8["best_round_speedup_vs_saved"] = min(r32["round_medians_ms"]) / min(r8["round_medians_ms"])
        r8["peak_rss_ratio_vs_saved"] = r8["peak_rss_mb"] / r32["peak_rss_mb"]
    manifest = BundleManifest.from_file(bundles["fp32"])
    result = {
        "model": manifest.model_id,
        "cut": args.cut,
        "lora_r": args.r,
        "batch": args.batch,
        "seq": args.seq,
        "runs": args.runs,
        "rounds": args.rounds,
        "threads": args.threads,
        "opt_level": args.opt_level,
        "ort_spinning": not args.no_spin,
        "ort_arena": args.arena,
        "load_avg_1min": os.getloadavg()[0],
        "nice": os.nice(0),
        "backends": res,
        "export_seconds": export_s if export_s is not None else manifest.export_seconds.get("total"),
        "export_breakdown_s": manifest.export_seconds,
        "bundle_bytes": {p.name: p.stat().st_size for p in sorted(bundles["fp32"].iterdir())},
    }
    if "int8" in bundles:
        q = BundleManifest.from_file(bundles["int8"])
        result["int8_bundle_bytes"] = {p.name: p.stat().st_size for p in sorted(bundles["int8"].iterdir())}
        result["int8_weights_ratio"] = q.weights_bytes / manifest.weights_bytes
        result["int8_bundle_ratio"] = sum(result["int8_bundle_bytes"].values()) / sum(result["bundle_bytes"].values())
        result["int8_quantization"] = q.quantization.to_dict() if q.quantization else None
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(
        f"edge step, {manifest.model_id} cut {args.cut}, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.runs} steps (load avg {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'backend':<10} {'median ms':>9} {'min ms':>7} {'speedup':>8} {'min-spd':>7} {'fwd':>6} {'bwd':>6} {'opt':>5} "
        f"{'step pk MB':>10} {'ratio':>5} {'steady pk':>9} {'ratio':>5} {'peak RSS':>8} {'ratio':>5} {'grad abs':>8} "
        f"{'grad rel':>8}"
    )
    for b, r in res.items():
        st = r["step_peak_mb"]
        sr = r.get("steady_step_mem_ratio_vs_torch", 1.0)
        print(
            f"{b:<10} {r['median_ms']:>9.1f} {r['min_ms']:>7.1f} {r.get('speedup_vs_torch', 1.0):>7.2f}x "
            f"{r.get('min_speedup_vs_torch', 1.0):>6.2f}x {r['fwd_ms']:>6.1f} {r['bwd_ms']:>6.1f} {r['opt_ms']:>5.2f} "
            f"{r['step_peak_delta_mb']:>10.1f} {r.get('step_mem_ratio_vs_torch', 1.0):>5.2f} "
            f"{st if st is not None else float('nan'):>9.1f} {sr if sr is not None else float('nan'):>5.2f} "
            f"{r['peak_rss_mb']:>8.1f} {r.get('peak_rss_ratio_vs_torch', 1.0):>5.2f} "
            f"{r.get('grad_max_abs_err', 0.0):>8.1e} {r.get('grad_max_rel_err', 0.0):>8.1e}"
        )
    print(
        "per-round medians ms: "
        + "; ".join(f"{b} " + "/".join(f"{t:.0f}" for t in r["round_medians_ms"]) for b, r in res.items())
    )
    print(
        "CPU ms per step (median): "
        + "; ".join(
            f"{b} {r['cpu_median_ms']:.0f}" + (f" ({r['cpu_speedup_vs_torch']:.2f}x)" if b != "torch" else "")
            for b, r in res.items()
        )
    )
    print(
        "best round of each: "
        + ", ".join(f"{b} {r['best_round_speedup']:.2f}x" for b, r in res.items() if b != "torch")
    )
    if "int8" in res:
        r8 = res["int8"]
        if "speedup_vs_saved" in r8:
            print(
                f"int8 vs fp32 saved: {r8['speedup_vs_saved']:.2f}x, CPU {r8['cpu_speedup_vs_saved']:.2f}x (rounds "
                + "/".join(f"{x:.2f}" for x in r8["round_speedups_vs_saved"])
                + f", best rounds {r8['best_round_speedup_vs_saved']:.2f}x), peak RSS {r8['peak_rss_ratio_vs_saved']:.2f}x"
            )
        print(
            f"int8 vs torch fp32: {r8['speedup_vs_torch']:.2f}x; h rel err {r8['h_rel_err']:.3f}, "
            f"grad rel err (max over factors) {r8['grad_max_fro_rel_err']:.3f}"
        )
        print(
            f"bundle: weights {manifest.weights_bytes / 1e6:.1f} MB fp32 -> "
            f"{result['int8_bundle_bytes'][manifest.weights_file] / 1e6:.1f} MB int8 "
            f"({result['int8_weights_ratio']:.3f}x); whole bundle {result['int8_bundle_ratio']:.3f}x"
        )
    for b, prof in profiles.items():
        for graph, ops in prof.items():
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:9])
            print(f"profile {b} {graph} (sum of node minimums {sum(ops.values()):.1f} ms): {top}")
    print(f"result: {args.result}")


if __name__ == "__main__":
    main()
