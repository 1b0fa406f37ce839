"""`splitwave` command line: export, server, edge, simulate, plan, export-adapter.

Heavy imports happen inside each command, so `splitwave edge` runs on a device that has only the `edge`
extra (no torch, no pydantic).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("splitwave")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.fx", "torch._export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_cfg(args):
    from splitwave.config import load_config

    return load_config(args.config, args.set)


def cmd_export(args) -> int:
    """Export the edge bundle of a config (model, cut, LoRA) to a folder."""
    from server.app import build_split, model_source, tokenizer_source
    from server.export import export_bundle

    cfg = _load_cfg(args)
    split = build_split(cfg)
    tok = tokenizer_source(cfg)
    manifest = export_bundle(split, args.out, modes=tuple(args.modes), model_id=model_source(cfg), tokenizer_dir=tok)
    print(json.dumps({k: manifest[k] for k in ("cut", "weights_sha256", "modes") if k in manifest}, indent=2))
    print(f"bundle written to {args.out}")
    return 0


def cmd_server(args) -> int:
    """Run a server until SIGTERM or until every round is done and every client has left."""
    from server.app import SplitServer
    from server.service import serve_forever, start_server
    from server.security import server_credentials

    cfg = _load_cfg(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or Path(cfg.output_dir) / cfg.name / "server")
    app = SplitServer(cfg, run_dir, cache_dir=Path(args.cache_dir))
    running = start_server(app, host=args.host or cfg.server.host,
                           port=cfg.server.port if args.port is None else args.port,
                           max_workers=cfg.server.max_workers, credentials=server_credentials(cfg.server.security))
    print(f"splitwave server listening on {args.host or cfg.server.host}:{running.port} (run {app.run_id})",
          flush=True)
    serve_forever(running, Path(args.ready_file) if args.ready_file else None)
    return 0


def cmd_edge(args) -> int:
    """Run one torch-free edge client against a server."""
    import grpc

    from edge.client import ClientOptions, EdgeClient, EdgeError, format_summary
    from edge.paths import DataNotFound
    from edge.retry import RetryPolicy
    from edge.security import channel_credentials

    opts = ClientOptions(name=args.name, cache_dir=Path(args.cache_dir), backend=args.backend, threads=args.threads,
                         enrollment_secret=args.secret or os.environ.get("SPLITWAVE_SECRET", ""),
                         metrics_path=Path(args.metrics) if args.metrics else None,
                         retry=RetryPolicy(connect_s=args.connect_timeout, total_s=args.retry_for),
                         data_dir=Path(args.data_dir) if args.data_dir else None,
                         credentials=channel_credentials(args.ca, args.cert, args.key))
    if opts.metrics_path:
        opts.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    client = EdgeClient(args.server, opts)
    try:
        summary = client.run()
    except (ConnectionError, EdgeError, DataNotFound) as e:  # one line: what failed, where, the likely cause
        print(f"splitwave edge: error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"splitwave edge: error: {args.server} refused: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
    return 0


def cmd_simulate(args) -> int:
    from splitwave.runner import simulate

    cfg = _load_cfg(args)
    out = simulate(cfg, virtual_only=args.virtual_only)
    print(f"report: {out}")
    return 0


def cmd_plan(args) -> int:
    from splitwave.plan import plan

    cfg = _load_cfg(args)
    plan(cfg, cuts=args.cuts)
    return 0


def cmd_export_adapter(args) -> int:
    from server.adapter_export import export_adapter

    info = export_adapter(Path(args.run_dir), Path(args.out_dir))
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitwave", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML experiment config (configs/*.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set training.batch_size=32 (repeatable)")

    sp = sub.add_parser("export", help="export the edge bundle (ONNX graphs + weights + manifest)")
    with_config(sp)
    sp.add_argument("--out", required=True)
    sp.add_argument("--modes", nargs="+", default=["recompute", "saved"], choices=["recompute", "saved"])
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("server", help="run the split-learning server")
    sp.add_argument("--config", required=True)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--run-dir")
    sp.add_argument("--cache-dir", default=".cache/bundles")
    sp.add_argument("--ready-file", help="write {port, run_id} here once serving")
    sp.add_argument("--threads", type=int, help="torch intra-op threads for the top model (default: torch's)")
    sp.set_defaults(fn=cmd_server)

    from edge.retry import RetryPolicy  # light (grpc only): the defaults shown in --help are the policy's

    sp = sub.add_parser("edge", help="run a torch-free edge client")
    sp.add_argument("--server", required=True, help="HOST:PORT of the server")
    sp.add_argument("--name", default="", help="requested client id (default: the server picks edge-N)")
    sp.add_argument("--cache-dir", default=os.environ.get("SPLITWAVE_EDGE_CACHE", ".cache/edge"),
                    help="bundle cache and resume secrets (env SPLITWAVE_EDGE_CACHE; default: %(default)s)")
    sp.add_argument("--data-dir", help="folder with this device's dataset files, e.g. DIR/sst2/train.tsv (default: "
                                       "env SPLITWAVE_DATA_DIR, else $SPLITWAVE_SHARED/data, else ./data, else "
                                       "../shared/data beside the checkout)")
    sp.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"],
                    help="edge runtime (default: %(default)s; torch is the reference, for comparisons)")
    sp.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    sp.add_argument("--secret", help="enrollment secret (default: env SPLITWAVE_SECRET)")
    sp.add_argument("--metrics", help="append per-step, per-round and summary JSON lines here")
    sp.add_argument("--connect-timeout", type=float, default=RetryPolicy.connect_s, metavar="S",
                    help="how long to keep trying a server not reached yet (default: %(default)g s)")
    sp.add_argument("--retry-for", type=float, default=RetryPolicy.total_s, metavar="S",
                    help="after the first contact, how long to retry a lost or restarting server "
                         "(default: %(default)g s)")
    sp.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    sp.add_argument("--ca", help="CA certificate (PEM) that signed the server certificate: enables TLS")
    sp.add_argument("--cert", help="client certificate (PEM) for mTLS")
    sp.add_argument("--key", help="client private key (PEM) for mTLS")
    sp.set_defaults(fn=cmd_edge)

    sp = sub.add_parser("simulate", help="run a simulated wireless experiment (server + N edge processes)")
    with_config(sp)
    sp.add_argument("--virtual-only", action="store_true", help="skip real-time shaping even if configured")
    sp.set_defaults(fn=cmd_simulate)

    sp = sub.add_parser("plan", help="predict the round time of every cut for a link and pick the best")
    with_config(sp)
    sp.add_argument("--cuts", type=int, nargs="*")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("export-adapter", help="write one standard PEFT adapter folder from a run")
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.set_defaults(fn=cmd_export_adapter)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # config and input errors: a clear message, not a traceback
        from_config = type(err).__name__ in ("ConfigError", "FileNotFoundError", "ValueError")
        if from_config and not args.verbose:
            print(f"splitwave {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
