"""A SplitLoRA-style table: SmolLM2-135M-Instruct fine-tuned with LoRA on E2E NLG, centralized vs over the split.

Rows, each with the same step budget (`--steps` training batches of `--batch-size` rows in all, whoever computes
them, so every row sees the same number of training samples):
- pretrained: the model before training (LoRA B = 0), prompted like the training rows (`MR <|im_end|>`);
- centralized LoRA: the unsplit peft model, one torch AdamW, on the same batches the split run sees;
- split, 1 client (sfl-v2): `splitwave simulate` with one ONNX Runtime edge process over gRPC; should equal
  the centralized row (tests/test_llm.py checks that step for step);
- SFL, 4 clients, fedit; and SFL, 4 clients with the best LoRA-aware strategy of `--strategies` (best BLEU);
- optional (`--rows ... sfl-4-int8`): SFL, 4 clients, fedit with the frozen edge base in int8 (`edge.quantize:
  int8`), to compare with the fp32 edge's fedit row.
Columns: BLEU and ROUGE-L (and NIST) of greedy decoding on `--num-prompts` E2E dev MRs against all their
references, eval loss per target token and perplexity on `--num-eval` dev rows, and the exact transport bytes
of training (activations, gradients, adapters; not the one-off bundle download) per training sample.

Writes results/llm/TAG.json and TAG.md. The default budget (800 batches of 8 x 96 tokens) is about an hour per row
on 2 uncontended cores (a LoRA step of the whole model at 8 x 96 takes ~3.5 s there, plus two evaluations of
~1.5 min); six rows with two LoRA-aware candidates: about six hours. The committed table (results/llm/llm.md)
was run with `--steps 240 --local-steps 5`, 12-16 min per row here, so that all its rows fit in one working
session. `--quick` runs every row at toy sizes in minutes to show the script works (its numbers mean nothing).

    python scripts/llm_table.py [--steps 800] [--strategies fedex-lora fedsa-lora] [--tag llm]
    python scripts/llm_table.py --steps 240 --local-steps 5      # the committed table
    python scripts/llm_table.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from splitwave.common.config import parse_config
from splitwave.common.shard import build_token_dataset
from splitwave.runner import simulate
from splitwave.server.adapter_export import export_adapter
from splitwave.server.datasets import data_spec
from splitwave.server.evaluation import evaluate
from splitwave.server.generation import Generator, text_metrics
from splitwave.server.models import build_model
from splitwave.server.reference import centralized_train
from splitwave.server.setup import build_split, model_source, tokenizer_source

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("llm_table")
OUT = ROOT / "results/llm"
DEFAULT_STRATEGIES = ["fedex-lora", "fedsa-lora"]
QUICK = dict(
    steps=4,
    batch_size=2,
    local_steps=1,
    num_train=64,
    num_eval=8,
    num_prompts=4,
    max_new_tokens=16,
    max_seq_len=64,
    strategies=["fedex-lora"],
)


def config(args, clients: int, strategy: str = "fedit", name: str = "row", quantize: str = "none") -> dict:
    """The run's config: configs/e2e-smollm2.yaml's model and LoRA, this table's data, budget and evaluation."""
    per_round = clients * args.local_steps
    if args.steps % per_round:
        raise SystemExit(f"--steps {args.steps} must be a multiple of clients x --local-steps = {per_round}")
    model = {"family": "smollm2", "tiny": False, "task": "causal-lm", "cut": args.cut}
    if args.model == "llama-tiny":  # configs/e2e-llama-tiny.yaml's model: the same path at CI size
        model = {"family": "llama", "tiny": True, "task": "causal-lm", "cut": args.cut, "tokenizer": "smollm2"}
        model |= {"init_std": 0.18, "tie_embeddings": True}
    return {
        "name": f"{args.tag}-{name}",
        "seed": args.seed,
        "num_clients": clients,
        "model": model,
        "lora": {"r": args.r, "alpha": 2 * args.r, "targets": ["q_proj", "v_proj"]},
        "edge": {"quantize": quantize},
        "data": {
            "dataset": "e2e",
            "num_train": args.num_train,
            "num_eval": args.num_eval,
            "max_seq_len": args.max_seq_len,
            "partition": "iid",
        },
        "training": {
            "mode": "sfl-v2",
            "batch_size": args.batch_size,
            "local_steps": args.local_steps,
            "edge_mode": "saved",
            "optim": {"lr": args.lr},
        },
        "rounds": {"num_rounds": args.steps // per_round, "deadline_s": 7200, "eval_every": 10**6},
        "aggregation": {"strategy": strategy},
        "generation": {"num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 16},
        "channel": {"mode": "none"},
        "output_dir": str(OUT / "runs"),
    }


def _in_process(args, cfg, split, wall0: float, steps: int) -> dict:
    """Eval loss / perplexity and generation metrics of an in-process model (pretrained, centralized)."""
    split.peft_model.eval()
    tok = tokenizer_source(cfg)
    evald = build_token_dataset(data_spec(cfg, "eval", int(split.peft_model.config.vocab_size)), tok)
    out = evaluate(split, evald)
    out.update(Generator.from_config(cfg, tok).score(split))
    return {
        **out,
        "steps": steps,
        "bytes_up_per_sample": None,
        "bytes_down_per_sample": None,
        "wall_s": time.time() - wall0,
    }


def pretrained(args) -> dict:
    t0 = time.time()
    cfg = parse_config(config(args, 1, name="pretrained"))
    return _in_process(args, cfg, build_split(cfg), t0, 0)


def centralized(args) -> dict:
    """Centralized LoRA on exactly the batches the one-client split run trains on (server/reference.py)."""
    t0 = time.time()
    cfg = parse_config(config(args, 1, name="centralized"))
    split, losses = centralized_train(cfg)
    out = _in_process(args, cfg, split, t0, len(losses))
    out["train_loss_last"] = float(np.mean(losses[-args.local_steps :]))
    return out


def split_run(args, clients: int, strategy: str, quantize: str = "none") -> dict:
    name = f"sfl{clients}-{strategy}" + ("" if quantize == "none" else f"-{quantize}")
    cfg = parse_config(config(args, clients, strategy, name=name, quantize=quantize))
    t0 = time.time()
    run = simulate(cfg, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    samples = args.steps * args.batch_size
    return {
        "run_dir": str(run.relative_to(ROOT)),
        "steps": args.steps,
        "eval_loss": last["eval_loss"],
        "eval_perplexity": last.get("eval_perplexity"),
        "eval_accuracy": last.get("eval_accuracy"),
        **{k: v for k, v in last.items() if k.startswith("gen_")},
        "bytes_up_per_sample": sum(r["bytes_up"] for r in rows) / samples,
        "bytes_down_per_sample": sum(r["bytes_down"] for r in rows) / samples,
        "setup_bytes_down": sum(r.get("bytes_setup_down", 0) for r in rows),
        "wall_s": time.time() - t0,
    }


def rescore(args, row: dict) -> dict:
    """BLEU / ROUGE-L / NIST of a split row's final adapters on `--rescore-prompts` dev MRs (all 547 by default:
    the run's own 64 are a noisy sample), decoded by the unsplit base model with the run's adapters exported as a
    standard PEFT folder (`splitwave export-adapter`), the path a user of the trained adapters takes."""
    from peft import PeftModel

    raw = config(args, 1, name="rescore")
    raw["generation"]["num_prompts"] = args.rescore_prompts
    cfg = parse_config(raw)
    with tempfile.TemporaryDirectory() as tmp:
        export_adapter(ROOT / row["run_dir"], Path(tmp) / "adapter")
        base = build_model(model_source(cfg), "causal-lm", seed=cfg.seed)
        model = PeftModel.from_pretrained(base, str(Path(tmp) / "adapter")).eval()
    gen = Generator.from_config(cfg, tokenizer_source(cfg))
    with torch.no_grad():
        texts = gen.decode(model)
    return {"prompts": len(texts), **{f"gen_{k}": v for k, v in text_metrics(texts, gen.references).items()}}


def _kb(v) -> str:
    return "—" if v is None else f"{v / 1e3:.1f}"


def table(results: dict, args) -> str:
    model = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny LLaMA (random weights)"
    lines = [
        f"{model} on E2E NLG, split after block {args.cut}, LoRA r={args.r} on q/v; every row trains "
        f"{args.steps} batches of {args.batch_size} rows (max {args.max_seq_len} tokens; {args.num_train} training "
        f"rows), AdamW lr {args.lr}. SFL: 4 clients x {args.local_steps} local steps per round, sfl-v2. BLEU, "
        f"ROUGE-L, NIST: greedy decoding of {args.num_prompts} E2E dev MRs against all their references; eval loss "
        f"per target token and perplexity on {args.num_eval} dev rows. Bytes: exact gRPC transport bytes of "
        "training (activations, gradients, adapters; not the bundle download) per training sample."
        + (" QUICK MODE: toy sizes, the numbers only show that the script runs." if args.quick else ""),
        "",
        "| row | BLEU | ROUGE-L | NIST | eval loss | perplexity | uplink kB/sample | downlink kB/sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = results.get("best_strategy")
    rows = [
        ("pretrained (before training)", "pretrained"),
        ("centralized LoRA", "centralized"),
        ("split, 1 client", "split-1"),
        ("SFL, 4 clients, fedit", "sfl-4/fedit"),
    ]
    if best:
        rows.append((f"SFL, 4 clients, {best} (best LoRA-aware)", f"sfl-4/{best}"))
    rows.append(("SFL, 4 clients, fedit, int8 edge base", "sfl-4-int8/fedit"))
    for label, key in rows:
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:60]} | | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['gen_bleu']:.2f} | {r['gen_rouge_l']:.2f} | {r['gen_nist']:.3f} | {r['eval_loss']:.4f} | "
            f"{r['eval_perplexity']:.3f} | {_kb(r['bytes_up_per_sample'])} | {_kb(r['bytes_down_per_sample'])} |"
        )
    rescored = {k: r["rescored"] for k, r in results.items() if isinstance(r, dict) and "rescored" in r}
    if rescored:
        n = next(iter(rescored.values()))["prompts"]
        lines += [
            "",
            f"The same final adapters decoded on {n} dev MRs (`--rescore`, through export-adapter -> PeftModel):",
            "",
        ]
        lines += ["| row | BLEU | ROUGE-L | NIST |", "|---|---|---|---|"]
        names = dict(rows)
        for key, m in rescored.items():
            label = next((lab for lab, k in names.items() if k == key), key)
            lines.append(f"| {label} | {m['gen_bleu']:.2f} | {m['gen_rouge_l']:.2f} | {m['gen_nist']:.3f} |")
    others = [s for s in args.strategies if s != best and f"sfl-4/{s}" in results]
    if others:
        lines += [
            "",
            "Other LoRA-aware strategies tried (4 clients): "
            + ", ".join(f"{s} BLEU {results[f'sfl-4/{s}'].get('gen_bleu', float('nan')):.2f}" for s in others),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="training batches per row (all clients together)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--num-train", type=int, default=8192)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, help="LoRA-aware candidates (best BLEU)")
    ap.add_argument(
        "--rows",
        nargs="*",
        choices=["pretrained", "centralized", "split-1", "sfl-4", "sfl-4-int8"],
        default=["pretrained", "centralized", "split-1", "sfl-4"],
        help="rows to run (results of earlier runs with the same --tag are kept; `--rows` alone: none)",
    )
    ap.add_argument("--model", choices=["smollm2", "llama-tiny"], default="smollm2")
    ap.add_argument("--quick", action="store_true", help="toy sizes: proves the script runs, in minutes")
    ap.add_argument(
        "--rescore",
        nargs="*",
        default=[],
        metavar="ROW",
        help="re-decode these split rows' final adapters (e.g. sfl-4/fedit)",
    )
    ap.add_argument("--rescore-prompts", type=int, default=10**6, help="dev MRs for --rescore (default: all)")
    ap.add_argument("--tag", default=None, help="result file name under results/llm/ (default: llm, or llm-quick)")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.tag = args.tag or ("llm-quick" if args.quick else "llm")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.tag}.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}

    def record(key: str, thunk) -> None:
        try:
            results[key] = thunk()
        except Exception as err:  # keep the table going; the failure is recorded, not hidden
            log.exception("%s failed", key)
            results[key] = {"error": str(err)}
        log.info(
            "%s: %s", key, {k: v for k, v in results[key].items() if k.startswith(("gen_bleu", "eval_loss", "error"))}
        )
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    if "pretrained" in args.rows:
        record("pretrained", lambda: pretrained(args))
    if "centralized" in args.rows:
        record("centralized", lambda: centralized(args))
    if "split-1" in args.rows:
        record("split-1", lambda: split_run(args, 1, "fedit"))
    if "sfl-4" in args.rows:
        for s in ["fedit", *args.strategies]:
            record(f"sfl-4/{s}", lambda s=s: split_run(args, 4, s))
    if "sfl-4-int8" in args.rows:
        record("sfl-4-int8/fedit", lambda: split_run(args, 4, "fedit", quantize="int8"))
    for key in args.rescore:
        if "run_dir" not in results.get(key, {}):
            raise SystemExit(f"--rescore {key}: no split run of that row in {path}")
        results[key]["rescored"] = rescore(args, results[key])
        log.info("%s rescored: %s", key, results[key]["rescored"])
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    tried = [s for s in args.strategies if "error" not in results.get(f"sfl-4/{s}", {"error": ""})]
    if tried:
        results["best_strategy"] = max(
            tried, key=lambda s: (results[f"sfl-4/{s}"]["gen_bleu"], -results[f"sfl-4/{s}"]["eval_loss"])
        )
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    md = table(results, args)
    (OUT / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
