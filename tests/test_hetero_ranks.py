"""Heterogeneous LoRA ranks on real edges: a rank-r_k client inside a rank-r ONNX graph."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from net_helpers import ROOT

from splitwave.common.config import parse_config
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.edge.ranks import RankAdapter
from splitwave.server.app import SplitServer
from splitwave.server.service import start_server


def test_rank_adapter_preserves_the_client_update():
    rng = np.random.default_rng(0)
    ad = RankAdapter(graph_rank=8, alpha=16.0)
    A, B = rng.standard_normal((3, 10)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    shapes = {"m.lora_A.weight": (8, 10), "m.lora_B.weight": (6, 8)}
    g = ad.to_graph({"m.lora_A.weight": A, "m.lora_B.weight": B}, shapes)
    assert g["m.lora_A.weight"].shape == (8, 10) and g["m.lora_B.weight"].shape == (6, 8)
    # the graph's scaling (16/8) on the padded factors equals the client's own (16/3) on its factors
    assert np.allclose(2.0 * g["m.lora_B.weight"] @ g["m.lora_A.weight"], (16 / 3) * B @ A, atol=1e-5)
    masked = ad.mask({k: np.ones(v) for k, v in shapes.items()})
    assert masked["m.lora_A.weight"][3:].sum() == 0 and masked["m.lora_B.weight"][:, 3:].sum() == 0
    assert np.allclose(ad.from_graph("m.lora_A.weight", g["m.lora_A.weight"]), A)
    assert np.allclose(ad.from_graph("m.lora_B.weight", g["m.lora_B.weight"]), B, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        ad.to_graph({"m.lora_A.weight": np.zeros((3, 9), np.float32)}, shapes)


@pytest.mark.parametrize("strategy", ["rbla", "hetlora", "flexlora", "flora"])
def test_clients_of_different_ranks_train_together(tmp_path, strategy):
    raw = {
        "num_clients": 2,
        "seed": 3,
        "model": {"family": "bert", "tiny": True, "cut": 2},
        "lora": {"r": 4, "alpha": 8},
        "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 64, "max_seq_len": 16},
        "training": {"batch_size": 8, "local_steps": 4, "optim": {"lr": 0.02}},
        "rounds": {"num_rounds": 3},
        "aggregation": {"strategy": strategy, "params": {"client_ranks": {"e0": 2, "e1": 4}}},
    }
    app = SplitServer(parse_config(raw), tmp_path / "run", cache_dir=ROOT / ".cache/bundles")
    with start_server(app) as srv:
        errors = []

        def run(c):
            try:
                c.run()
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=(c,))
            for c in (
                EdgeClient(srv.address, ClientOptions(name=f"e{i}", cache_dir=tmp_path / "cache")) for i in range(2)
            )
        ]
        [t.start() for t in threads]
        [t.join(180) for t in threads]
    assert not errors, errors
    rows = app.rounds.history
    assert len(rows) == 3 and all(r.reported == ["e0", "e1"] for r in rows)  # both ranks accepted every round
    ranks = {c: app.strategy.known_ranks.get(c) for c in ("e0", "e1")}
    assert ranks == {"e0": 2, "e1": 4} or strategy == "flora"
    lines = [json.loads(x) for x in (tmp_path / "run/server_metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval_loss"] < lines[0]["eval_loss"]  # the mixed-rank federation learns
