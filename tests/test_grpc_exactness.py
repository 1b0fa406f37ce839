"""Split training across real processes over loopback gRPC equals the same training in one process
(classification, and causal LM on E2E text)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from splitwave.common.config import parse_config
from splitwave.launch import ProcessGroup, child_env
from splitwave.server.adapter_export import EDGE_FILE, FINAL_DIR, TOP_FILE, load_npz
from splitwave.server.reference import centralized_train, federated_train
from splitwave.server.trainer import trainable_parameters

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "seed": 3,
    "model": {"family": "bert", "tiny": True, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 32, "max_seq_len": 16},
    "training": {
        "batch_size": 8,
        "local_steps": 3,
        "codec_up": "raw",
        "codec_down": "raw",
        "optim": {"lr": 0.01, "weight_decay": 0.01},
    },
    "rounds": {"num_rounds": 2, "deadline_s": 120},
    "aggregation": {"strategy": "fedit"},
}


def _run(tmp_path, raw: dict, n_edges: int):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "server"
    with ProcessGroup(cwd=ROOT, env=child_env(omp_threads=1)) as procs:
        procs.start_server(
            cfg_path,
            run_dir=run,
            cache_dir=ROOT / ".cache" / "bundles",
            ready_file=run / "ready.json",
            log=run / "server.log",
        )
        port = procs.wait_ready("server", run / "ready.json", timeout=300)
        edges = [f"e{i}" for i in range(n_edges)]
        for name in edges:
            procs.start_edge(
                name,
                f"127.0.0.1:{port}",
                cache_dir=tmp_path / "cache",
                metrics=tmp_path / f"{name}.jsonl",
                log=tmp_path / f"{name}.log",
            )
        procs.wait_exit(edges, timeout=240)
    final = run / FINAL_DIR
    return load_npz(final / EDGE_FILE), load_npz(final / TOP_FILE)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:4]
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def _e2e_gpt2() -> dict:
    """configs/e2e-gpt2-tiny.yaml's model, LoRA and data (so the same cached bundle), trained like BASE."""
    raw = yaml.safe_load((ROOT / "configs" / "e2e-gpt2-tiny.yaml").read_text())
    return {
        **raw,
        "data": {**raw["data"], "num_train": 96, "num_eval": 16},
        "training": BASE["training"],
        "rounds": BASE["rounds"],
        "aggregation": BASE["aggregation"],
        "channel": {"mode": "none"},
    }


@pytest.mark.parametrize("raw", [BASE, _e2e_gpt2()], ids=["bert-cls", "gpt2-e2e-causal-lm"])
def test_one_edge_process_equals_centralized_lora(tmp_path, raw):
    raw = {**raw, "num_clients": 1, "training": {**raw["training"], "mode": "sfl-v2"}}
    edge, top = _run(tmp_path, raw, 1)
    split, losses = centralized_train(parse_config(raw))
    ref = {k: p.detach().numpy() for k, p in trainable_parameters(split.peft_model).items()}
    ref_edge = {k: v for k, v in ref.items() if k in edge}
    ref_top = {k: v for k, v in ref.items() if k not in edge}
    moved = max(float(np.abs(ref_edge[k] - split_init).max()) for k, split_init in _initial_edge(raw).items())
    assert moved > 1e-3  # training really changed the edge factors: the comparison below is not vacuous
    logging.getLogger(__name__).info(
        "%s: edge max error %.2e, top %.2e, edge moved %.2e, losses %s",
        raw["model"],
        _max_diff(edge, ref_edge),
        _max_diff(top, ref_top),
        moved,
        [round(x, 4) for x in losses],
    )
    assert _max_diff(edge, ref_edge) < 1e-5
    assert _max_diff(top, ref_top) < 1e-5


def _initial_edge(raw):
    from splitwave.server.setup import build_split

    return build_split(parse_config(raw)).edge_factors()


def test_three_edge_processes_sfl_v1_equal_in_process_federation(tmp_path):
    raw = {**BASE, "num_clients": 3, "training": {**BASE["training"], "mode": "sfl-v1"}}
    edge, top = _run(tmp_path, raw, 3)
    ref_edge, ref_top = federated_train(parse_config(raw))
    assert _max_diff(edge, ref_edge) < 1e-5
    assert _max_diff(top, ref_top) < 1e-5
