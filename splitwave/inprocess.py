"""A server and edge clients in one process: the tiny config, an in-process gRPC server, edges in threads.

For tests, benchmarks and probes that need a real server and real edges talking gRPC on loopback but no
child processes (`splitwave.launch` starts processes). Every run of `TINY_CONFIG` uses the same model,
LoRA and seed, so its edge bundle is exported once and then found in the bundle cache; it uses sfl-v1 (a
top adapter per client), which makes a client's result independent of how its steps interleave with other
clients' steps, so runs can be compared bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from splitwave.common.config import ExperimentConfig, parse_config
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.server.app import SplitServer
from splitwave.server.service import RunningServer, start_server

#: tiny BERT (cut 2, LoRA r 4), synthetic data, sfl-v1, 2 rounds of 3 steps: seconds per run on one core
TINY_CONFIG: dict[str, Any] = {
    "seed": 0,
    "num_clients": 1,
    "model": {"family": "bert", "tiny": True, "task": "seq-cls", "num_labels": 2, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 128, "num_eval": 32, "max_seq_len": 16},
    "training": {"mode": "sfl-v1", "batch_size": 8, "local_steps": 3, "optim": {"lr": 0.003}},
    "rounds": {"num_rounds": 2, "deadline_s": 30},
}


def tiny_config(overrides: list[str] | None = None, **sections: Any) -> ExperimentConfig:
    """`TINY_CONFIG`; a dict in `sections` extends that top-level section (other values replace it), then
    `overrides` (`a.b=value`, as `--set`) apply."""
    raw = copy.deepcopy(TINY_CONFIG)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    return parse_config(raw, overrides or [])


@contextlib.contextmanager
def serving(
    cfg: ExperimentConfig,
    run_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    credentials: grpc.ServerCredentials | None = None,
) -> Iterator[RunningServer]:
    """A server of `cfg` on a free loopback port (`.address`), its bundles in `cache_dir`; always stopped."""
    app = SplitServer(cfg, Path(run_dir), cache_dir=Path(cache_dir))
    running = start_server(app, credentials=credentials)
    try:
        yield running
    finally:
        running.stop(0.5)


def make_client(
    address: str,
    name: str,
    cache_dir: str | os.PathLike,
    cls: type[EdgeClient] | None = None,
    threads: int = 1,
    **opts: Any,
) -> EdgeClient:
    """An edge client (`cls`, default EdgeClient) for `address`; `opts` are further `ClientOptions`."""
    return (cls or EdgeClient)(address, ClientOptions(name=name, cache_dir=Path(cache_dir), threads=threads, **opts))


def run_clients(
    address: str,
    names: list[str],
    cache_dir: str | os.PathLike,
    timeout: float = 120.0,
    classes: dict[str, type[EdgeClient]] | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """Run edge clients in threads until the server lets them go; {name: summary, or the exception raised}.
    `classes` maps a name to an EdgeClient subclass to run under that name; RuntimeError if a client is
    still running after `timeout` s."""
    out: dict[str, Any] = {}

    def go(n: str) -> None:
        c = make_client(address, n, cache_dir, cls=(classes or {}).get(n), **opts)
        try:
            out[n] = c.run()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            out[n] = e
        finally:
            c.close()

    threads = [threading.Thread(target=go, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise RuntimeError("edge clients did not finish")
    return out


def final_factors(app: SplitServer) -> dict[str, np.ndarray]:
    """A run's result: the global edge adapter (`edge/NAME`) and the (aggregated) top adapter (`top/NAME`)."""
    return {
        **{f"edge/{k}": np.array(v) for k, v in app.global_edge_factors().items()},
        **{f"top/{k}": np.array(v) for k, v in app.final_top_factors().items()},
    }
