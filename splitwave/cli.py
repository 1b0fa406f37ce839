"""`splitwave` command line: export, server, edge, simulate, plan, export-adapter, certs.

Heavy imports happen inside each command (on purpose, not an oversight), so `splitwave edge` runs on a
device that has only the `edge` extra (no torch, no pydantic).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type names only: importing the server needs torch
    from splitwave.server.app import SplitServer

log = logging.getLogger("splitwave")

#: loggers of libraries that narrate ONNX export and model loading at WARNING; quiet unless -v
THIRD_PARTY_LOGGERS = (
    "onnx_ir",
    "onnxscript",
    "torch",
    "torch.onnx",
    "torch._dynamo",
    "torch.fx",
    "torch._export",
    "transformers",
    "peft",
    "huggingface_hub",
)
#: errors a user fixes (config, files, addresses): one line on stderr instead of a traceback, unless -v
USER_ERRORS = ("ConfigError", "FileNotFoundError", "ValueError", "BindError", "PermissionError")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose <= 0:
        # third-party chatter (export warnings, progress bars, load reports) hides what the run itself says;
        # -v shows it. SplitWave's own warnings go through logging, never through `warnings`.
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    _quiet_third_party(verbose)


def _quiet_third_party(verbose: int) -> None:
    """Again after torch is imported: torch sets its loggers' levels (TORCH_LOGS) at import."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose > 0 else logging.ERROR)


def _load_cfg(args: argparse.Namespace):
    from splitwave.common.config import load_config

    return load_config(args.config, args.set)


def _set_arg(item: str) -> str:
    """argparse type of `--set`: `key=value` in one argument."""
    from splitwave.common.config import ConfigError, check_override

    try:
        return check_override(item)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_export(args: argparse.Namespace) -> int:
    """Export the edge bundle of a config (model, cut, LoRA) to a folder."""
    from splitwave.server.export import export_bundle
    from splitwave.server.setup import build_split, model_source, tokenizer_source

    _quiet_third_party(args.verbose)
    cfg = _load_cfg(args)
    split = build_split(cfg)
    tok = tokenizer_source(cfg)
    export = dict(modes=tuple(args.modes), model_id=model_source(cfg), tokenizer_dir=tok)
    if cfg.edge.quantize == "none":
        manifest = export_bundle(split, args.out, **export)
    else:  # edge.quantize: the int8 bundle is derived from the fp32 one
        from splitwave.server.export.quantize import quantize_bundle, weight_names

        with tempfile.TemporaryDirectory() as fp32:
            fp32_manifest = export_bundle(split, fp32, **export)
            params = {k: p.detach().float().numpy() for k, p in split.edge.named_parameters()}
            names = weight_names(params, fp32_manifest)
            manifest = quantize_bundle(fp32, args.out, cfg.edge.quantize, keep=cfg.edge.keep_fp32, names=names)
    print(
        json.dumps({"cut": manifest.cut, "weights_sha256": manifest.weights_sha256, "modes": manifest.modes}, indent=2)
    )
    print(f"bundle written to {args.out}")
    return 0


def server_results(app: SplitServer, run_dir: Path) -> list[str]:
    """What a finished (or stopped) server tells its user: rounds done, the last evaluation, where the files are."""
    from splitwave.server.adapter_export import FINAL_DIR

    lines = (
        [json.loads(x) for x in app.metrics_path.read_text().splitlines() if x.strip()]
        if app.metrics_path.exists()
        else []
    )
    total = app.cfg.rounds.num_rounds
    head = (
        f"finished {len(lines)} of {total} rounds"
        if len(lines) >= total
        else f"stopped after {len(lines)} of {total} rounds"
    )
    evals = [x for x in lines if "eval_accuracy" in x]
    if evals:
        last = evals[-1]
        figs = ", ".join(
            f"{k[5:]} {last[k]:.4f}" for k in ("eval_accuracy", "eval_loss", "eval_perplexity") if k in last
        )
        head += (
            f"; global model after round {last['round']}: {figs} on {last.get('eval_count', '?')} eval "
            f"{'tokens' if app.cfg.model.task == 'causal-lm' else 'rows'}"
        )
    out = [head, f"results in {run_dir}/: server_metrics.jsonl (one line per round)"]
    if (run_dir / FINAL_DIR).exists():
        out.append(f"  {FINAL_DIR}/ (final adapters; `splitwave export-adapter {run_dir} OUT_DIR` makes a PEFT folder)")
    return out


def cmd_server(args: argparse.Namespace) -> int:
    """Run a server until SIGTERM or until every round is done and every client has left."""
    from splitwave.runner import make_run_dir
    from splitwave.server.app import SplitServer
    from splitwave.server.security import server_credentials
    from splitwave.server.service import bind_server, serve_forever, start_server

    _quiet_third_party(args.verbose)
    if args.config and args.config_opt and args.config != args.config_opt:
        raise ValueError(f"two configs given ({args.config}, --config {args.config_opt}); give one")
    args.config = args.config or args.config_opt
    if not args.config:
        raise ValueError("no config given: splitwave server CONFIG [--set KEY=VALUE ...]")
    cfg = _load_cfg(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    credentials = server_credentials(cfg.server.security)
    bound = bind_server(cfg, host, port, credentials=credentials)  # a taken port fails now, not after the export
    run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(cfg)
    print(
        f"splitwave server: run folder {run_dir}; holding {host}:{bound[1]} while the model and the edge bundle "
        f"are prepared",
        flush=True,
    )
    app = SplitServer(cfg, run_dir, cache_dir=Path(args.cache_dir))
    running = start_server(app, host=host, bound=bound)
    tls = "plaintext, no TLS" if credentials is None else "mTLS" if cfg.server.security.client_ca else "TLS"
    print(
        f"splitwave server listening on {host}:{running.port} ({tls}, run {app.run_id}): waiting for "
        f"{cfg.num_clients} client(s), {cfg.rounds.num_rounds} round(s)",
        flush=True,
    )
    serve_forever(running, Path(args.ready_file) if args.ready_file else None)
    for line in server_results(app, run_dir):
        print(line, flush=True)
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    """Run one torch-free edge client against a server."""
    import grpc

    from splitwave.common.paths import DataNotFound
    from splitwave.edge.client import ClientOptions, EdgeClient, EdgeError, format_summary
    from splitwave.edge.retry import RetryPolicy
    from splitwave.edge.security import channel_credentials

    opts = ClientOptions(
        name=args.name,
        cache_dir=Path(args.cache_dir),
        backend=args.backend,
        threads=args.threads,
        enrollment_secret=args.secret or os.environ.get("SPLITWAVE_SECRET", ""),
        metrics_path=Path(args.metrics) if args.metrics else None,
        retry=RetryPolicy(connect_s=args.connect_timeout, total_s=args.retry_for),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        credentials=channel_credentials(args.ca, args.cert, args.key),
    )
    if opts.metrics_path:
        opts.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    make_backend = None  # the client's own: ONNX Runtime
    if args.backend == "torch":  # the reference backend, for comparisons only
        from splitwave.server.torch_edge import torch_backend  # lazy: torch is not on an edge device

        make_backend = torch_backend
    client = EdgeClient(args.server, opts, make_backend=make_backend)
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from splitwave.runner import simulate

    cfg = _load_cfg(args)
    out = simulate(cfg, virtual_only=args.virtual_only)
    print(f"report: {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from splitwave.plan import plan

    _quiet_third_party(args.verbose)
    cfg = _load_cfg(args)
    plan(cfg, cuts=args.cuts)
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from splitwave.server.adapter_export import export_adapter

    info = export_adapter(Path(args.run_dir), Path(args.out_dir))
    print(json.dumps(info, indent=2))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Development PKI for TLS / mTLS (see splitwave/certs.py)."""
    from splitwave.certs import make_pki

    pki = make_pki(args.out_dir, hosts=args.hosts, clients=args.clients, days=args.days, reuse_ca=not args.new_ca)
    files = [
        "ca.pem + ca.key (the CA; ca.key stays private)",
        f"server.pem + server.key ({'kept, ' if pki.kept_server else ''}valid for {', '.join(pki.hosts)})",
        *(f"{n}.pem + {n}.key" for n in pki.clients),
    ]
    print(f"{pki.dir}/: {'; '.join(files)}; keys are mode 0600, new certificates valid {args.days} days")
    sec = "--set server.security."
    print(
        f"server: {sec}insecure=false {sec}server_cert={pki.server_cert} {sec}server_key={pki.server_key}"
        + (f" {sec}client_ca={pki.ca}" if pki.clients else "")
    )
    first = next(iter(pki.clients.items()), None)
    print(
        f"edge:   --ca {pki.ca}"
        + (f" --cert {first[1][0]} --key {first[1][1]}" if first else "")
        + ("   (each device its own pair)" if first else "")
    )
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; a None/False/[] default is explained in the help text instead."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        if isinstance(action.default, list):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more output: -v shows third-party warnings (torch, ONNX export, transformers), -vv debug "
        "logs and tracebacks (default: neither)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="warnings and errors only",
    )


class _SubParser(argparse.ArgumentParser):
    """Every subcommand: the same help formatter, and -v/-q accepted after the subcommand too."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _Help)
        super().__init__(*a, **k)
        _verbosity(self, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitwave", description=__doc__.splitlines()[0], formatter_class=_Help)
    _verbosity(p, 0)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser, metavar="COMMAND")

    def with_config(sp, optional=False):
        sp.add_argument(
            "config", nargs="?" if optional else None, metavar="CONFIG", help="YAML experiment config (configs/*.yaml)"
        )
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            type=_set_arg,
            help="override a config field, e.g. --set training.batch_size=32 (repeatable; one argument "
            "each, no space around =; default: none)",
        )

    sp = sub.add_parser("export", help="export the edge bundle (ONNX graphs + weights + manifest)")
    with_config(sp)
    sp.add_argument("--out", required=True, help="folder to write the bundle to (required)")
    sp.add_argument(
        "--modes",
        nargs="+",
        default=["recompute", "saved"],
        choices=["recompute", "saved"],
        help="edge training graphs to export: recompute (low memory) and/or saved (faster backward)",
    )
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("server", help="run the split-learning server")
    with_config(sp, optional=True)
    sp.add_argument("--config", dest="config_opt", metavar="CONFIG", help="deprecated spelling of CONFIG")
    sp.add_argument(
        "--host",
        help="address to listen on, 0.0.0.0 for every interface (default: server.host of the config, 127.0.0.1)",
    )
    sp.add_argument(
        "--port",
        type=int,
        help="port to listen on, 0 = a free port (printed, and in --ready-file) "
        "(default: server.port of the config, 0)",
    )
    sp.add_argument(
        "--run-dir",
        help="folder for this run's metrics and final adapters (default: a new "
        "OUTPUT_DIR/NAME/YYYYmmdd-HHMMSS from the config's output_dir and name)",
    )
    sp.add_argument(
        "--cache-dir",
        default=".cache/bundles",
        help="where exported edge bundles are kept (the first start of a model exports one)",
    )
    sp.add_argument("--ready-file", help="write {port, run_id} here once serving (default: none)")
    sp.add_argument("--threads", type=int, help="torch intra-op threads for the top model (default: torch's)")
    sp.set_defaults(fn=cmd_server)

    from splitwave.edge.retry import RetryPolicy  # light (grpc only): the defaults shown in --help are the policy's

    sp = sub.add_parser("edge", help="run a torch-free edge client")
    sp.add_argument("--server", required=True, help="HOST:PORT of the server")
    sp.add_argument("--name", default="", help="requested client id (default: the server picks edge-N)")
    sp.add_argument(
        "--cache-dir",
        default=os.environ.get("SPLITWAVE_EDGE_CACHE", ".cache/edge"),
        help="bundle cache and resume secrets (env SPLITWAVE_EDGE_CACHE; default: %(default)s)",
    )
    sp.add_argument(
        "--data-dir",
        help="folder with this device's dataset files, e.g. DIR/sst2/train.tsv (default: "
        "env SPLITWAVE_DATA_DIR, else $SPLITWAVE_SHARED/data, else ./data, else "
        "../shared/data beside the checkout)",
    )
    sp.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "torch"],
        help="edge runtime (default: %(default)s; torch is the reference, for comparisons)",
    )
    sp.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    sp.add_argument("--secret", help="enrollment secret (default: env SPLITWAVE_SECRET)")
    sp.add_argument("--metrics", help="append per-step, per-round and summary JSON lines here (default: none)")
    sp.add_argument(
        "--connect-timeout",
        type=float,
        default=RetryPolicy.connect_s,
        metavar="S",
        help="how long to keep trying a server not reached yet (default: %(default)g s)",
    )
    sp.add_argument(
        "--retry-for",
        type=float,
        default=RetryPolicy.total_s,
        metavar="S",
        help="after the first contact, how long to retry a lost or restarting server (default: %(default)g s)",
    )
    sp.add_argument(
        "--json", action="store_true", help="print the final summary as one JSON line (default: a readable summary)"
    )
    sp.add_argument(
        "--ca", help="CA certificate (PEM) that signed the server certificate: enables TLS (default: plaintext)"
    )
    sp.add_argument("--cert", help="client certificate (PEM) for mTLS (default: none)")
    sp.add_argument("--key", help="client private key (PEM) for mTLS (default: none)")
    sp.set_defaults(fn=cmd_edge)

    sp = sub.add_parser(
        "simulate",
        help="run a simulated wireless experiment (virtual: the simulation engine; none/realtime: server + N edge "
        "processes)",
    )
    with_config(sp)
    sp.add_argument(
        "--virtual-only",
        action="store_true",
        help="run on the simulation engine (virtual clock) even if channel.mode is realtime (default: off)",
    )
    sp.set_defaults(fn=cmd_simulate)

    sp = sub.add_parser("plan", help="predict the round time of every cut for a link and pick the best")
    with_config(sp)
    sp.add_argument("--cuts", type=int, nargs="*", help="cuts to compare (default: every cut of the model)")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("export-adapter", help="write one standard PEFT adapter folder from a run")
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a server's run folder (it holds final/)")
    sp.add_argument("out_dir", metavar="OUT_DIR", help="folder for the PEFT adapter")
    sp.set_defaults(fn=cmd_export_adapter)

    sp = sub.add_parser("certs", help="make a development CA, a server certificate and client certificates")
    sp.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="folder for ca.pem/ca.key, server.pem/server.key and NAME.pem/NAME.key per client",
    )
    sp.add_argument(
        "--hosts",
        nargs="+",
        metavar="HOST",
        help="host names and IP addresses the server certificate is valid for: every name or address "
        "the edges use in --server HOST:PORT (default: localhost 127.0.0.1 ::1; a server "
        "certificate already in OUT_DIR from its CA is kept unless --hosts is given)",
    )
    sp.add_argument(
        "--clients",
        nargs="+",
        default=[],
        metavar="NAME",
        help="client certificates to make, for mTLS; the name becomes the client id (default: none)",
    )
    sp.add_argument("--days", type=int, default=365, help="validity of the certificates in days")
    sp.add_argument(
        "--new-ca",
        action="store_true",
        help="make a new CA even if OUT_DIR has one (default: reuse it, so that new client "
        "certificates work with a server that already trusts ca.pem)",
    )
    sp.set_defaults(fn=cmd_certs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = -1 if args.quiet else args.verbose
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # config, input and address errors: a clear message, not a traceback
        if type(err).__name__ in USER_ERRORS and args.verbose < 2:
            print(f"splitwave {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
