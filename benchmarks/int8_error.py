"""How far the int8 edge (edge.quantize: int8) is from the fp32 one on real text, and which products matter.

1. `h` and LoRA-gradient error of the int8 bundle against the fp32 bundle of all-MiniLM-L6-v2 (--cut, r 8) on
   the first --sentences SST-2 dev sentences (random factors, random grad_h on the real tokens), with groups
   of frozen weights kept fp32 (`edge.keep_fp32` patterns): which products are outlier-sensitive.
2. With --runs RUN_DIR...: the final adapters of finished SST-2 runs (`splitwave simulate ... --set
   edge.quantize=none|int8`) evaluated on the whole SST-2 dev set through the fp32 edge (the server's torch
   model, what the runs report) and through the int8 ORT edge (+ the server's top).
Writes benchmarks/results/int8_error.json.

    .venv/bin/python benchmarks/int8_error.py [--cut 2 --sentences 256] [--runs runs/sst2-*/2026*/]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: label -> edge.keep_fp32 patterns (MiniLM parameter names of the split's edge)
GROUPS = {
    "all int8": [],
    "embeddings fp32": ["embeddings.*"],
    "query/key/value fp32": ["*self.query*", "*self.key*", "*self.value*"],
    "attention.output.dense fp32": ["*attention.output.dense*"],
    "intermediate.dense (FFN in) fp32": ["*intermediate.dense*"],
    "output.dense (FFN out) fp32": ["trunk.blocks.?.output.dense.weight"],
    "FFN in + out fp32": ["*intermediate.dense*", "trunk.blocks.?.output.dense.weight"],
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sweep(args) -> dict:
    # lazy: the run evaluation below needs only part of these
    from splitwave.common.manifest import BundleManifest
    from splitwave.common.tokenizer import Tokenizer
    from splitwave.edge.runtime import EdgeRuntime
    from splitwave.server.export.quantize import quantize_bundle, weight_names
    from splitwave.server.models import build_model
    from splitwave.server.pretrained import minilm_path
    from splitwave.server.setup import cached_bundle
    from splitwave.server.split import LoraSpec, split_model

    split = split_model(build_model(minilm_path(), "seq-cls"), args.cut, LoraSpec(r=8, alpha=16), "seq-cls")
    ident = {"model": "minilm", "cut": args.cut, "r": 8, "v": 2}  # benchmarks/edge_step.py's bundle
    src = cached_bundle(
        ROOT / ".cache" / "bench",
        ident,
        split,
        label="minilm",
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        tokenizer_dir=minilm_path(),
        trace_shape=(3, 11),
    )
    params = {k: p.detach().numpy() for k, p in split.edge.named_parameters()}
    names = weight_names(params, BundleManifest.from_file(src))
    rows = (ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    ids, mask = Tokenizer.from_dir(src).encode_batch(
        [r.split("\t")[0] for r in rows[: args.sentences]], max_len=64, pad_to="longest"
    )
    valid = mask[..., None].astype(bool)
    rng = np.random.default_rng(0)
    ref = EdgeRuntime(src, mode="saved", threads=args.threads)
    factors = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.factors.items()}
    ref.set_factors(factors)
    h0 = ref.forward(ids, mask)
    gh = (rng.standard_normal(h0.shape) * valid).astype(np.float32)
    g0 = ref.backward(gh)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, keep in GROUPS.items():
            dst = Path(tmp) / "q"
            shutil.rmtree(dst, ignore_errors=True)
            m = quantize_bundle(src, dst, keep=keep, names=names)
            rt = EdgeRuntime(dst, mode="saved", threads=args.threads)
            rt.set_factors(factors)
            h = rt.forward(ids, mask)
            g = rt.backward(gh)
            out[label] = {
                "keep_fp32": keep,
                "h_rel_err": _rel(h * valid, h0 * valid),
                "grad_rel_err_max": max(_rel(g[k], g0[k]) for k in g0),
                "grad_rel_err_median": float(np.median([_rel(g[k], g0[k]) for k in g0])),
                "weights_ratio": m.weights_bytes / m.quantization.fp32_weights_bytes,
                "kept_fp32": m.quantization.kept_fp32,
            }
            r = out[label]
            print(
                f"{label:<34} h {r['h_rel_err']:.4f}  grads max {r['grad_rel_err_max']:.4f} "
                f"median {r['grad_rel_err_median']:.4f}  weights {r['weights_ratio']:.3f}x",
                flush=True,
            )
    return {"cut": args.cut, "sentences": int(ids.shape[0]), "padded_seq": int(ids.shape[1]), "groups": out}


def evaluate_runs(runs: list[str]) -> dict:
    """Each run's final adapters on the whole SST-2 dev set, through the fp32 edge and the int8 edge."""
    import torch

    from splitwave.common.config import load_config
    from splitwave.common.shard import build_token_dataset
    from splitwave.edge.runtime import EdgeRuntime
    from splitwave.server.adapter_export import apply_to_split, load_npz
    from splitwave.server.datasets import data_spec
    from splitwave.server.setup import build_split, ensure_bundle
    from splitwave.server.trainer import _accuracy

    out = {}
    for run in map(Path, runs):
        cfg = load_config(run / "config.yaml")
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        split = build_split(cfg)
        edge = load_npz(run / "server" / "final" / "edge_factors.npz")
        apply_to_split(split, edge, load_npz(run / "server" / "final" / "top_factors.npz"))
        int8 = cfg.model_copy(update={"edge": cfg.edge.model_copy(update={"quantize": "int8"})})
        bundle = ensure_bundle(int8, ROOT / ".cache" / "bundles", build_split(int8))
        whole = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_eval": None})})
        data = build_token_dataset(data_spec(whole, "eval", int(split.peft_model.config.vocab_size)), bundle)
        rt = EdgeRuntime(bundle, mode="recompute")
        rt.set_factors(edge)
        acc = {}
        with torch.no_grad():
            for name in ("fp32 edge", "int8 edge"):
                correct = count = 0
                for i in range(0, len(data), 64):
                    ids, mask, labels = data.batch(np.arange(i, min(len(data), i + 64)))
                    if name == "fp32 edge":
                        logits = split(torch.from_numpy(ids), torch.from_numpy(mask))
                    else:
                        h = torch.from_numpy(rt.forward(ids, mask))
                        rt.take_pending()
                        logits = split.server(h, torch.from_numpy(mask))
                    c, k = _accuracy(logits, torch.from_numpy(labels), split.task)
                    correct, count = correct + c, count + k
                acc[name] = correct / count
        out[str(run)] = {
            "trained_with": cfg.edge.quantize,
            "seed": cfg.seed,
            "num_clients": cfg.num_clients,
            "dev_accuracy": acc,
            "dev_count": count,
            "reported_eval_accuracy_per_round": [m.get("eval_accuracy") for m in metrics],
        }
        print(run, out[str(run)], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", nargs="*", default=[], help="finished SST-2 run folders to evaluate")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "int8_error.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.result)
    result = json.loads(path.read_text()) if path.exists() else {}
    if not args.skip_sweep:
        result["h_and_grad_error"] = sweep(args)
    if args.runs:
        result["sst2_runs"] = evaluate_runs(args.runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"result: {path}")


if __name__ == "__main__":
    main()
