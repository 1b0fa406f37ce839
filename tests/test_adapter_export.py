"""`splitwave export-adapter` writes one standard PEFT folder that peft itself loads on the base model."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from net_helpers import ROOT
from peft import PeftModel

from splitwave.cli import main as cli_main
from splitwave.common.config import parse_config
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.server.adapter_export import EDGE_FILE, FINAL_DIR, TOP_FILE, apply_to_split, load_npz
from splitwave.server.app import SplitServer
from splitwave.server.models import build_model
from splitwave.server.service import start_server
from splitwave.server.setup import build_split


def _train(tmp_path, raw):
    app = SplitServer(parse_config(raw), tmp_path / "run", cache_dir=ROOT / ".cache/bundles")
    with start_server(app) as srv:
        threads = [
            threading.Thread(
                target=lambda i=i: EdgeClient(
                    srv.address, ClientOptions(name=f"e{i}", cache_dir=tmp_path / "cache")
                ).run()
            )
            for i in range(raw["num_clients"])
        ]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    return app


# the GPT-2 case exports its own bundle (~45 s on CI): slow suite; BERT keeps the path in the default suite
@pytest.mark.parametrize("family,mode", [("bert", "sfl-v2"), pytest.param("gpt2", "sfl-v1", marks=pytest.mark.slow)])
def test_exported_adapter_loads_in_peft_and_matches_split_logits(tmp_path, family, mode):
    raw = {
        "num_clients": 2,
        "seed": 3,
        "model": {"family": family, "tiny": True, "cut": 2},
        "lora": {"r": 4, "alpha": 8},
        "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 32, "max_seq_len": 16},
        "training": {"mode": mode, "batch_size": 8, "local_steps": 3, "optim": {"lr": 0.02}},
        "rounds": {"num_rounds": 2},
    }
    app = _train(tmp_path, raw)
    run = tmp_path / "run"
    assert cli_main(["-q", "export-adapter", str(run), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter/adapter_config.json").exists()
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()
    # the folder `splitwave simulate` prints (runs/NAME/TS) holds the server's run in server/: accepted as is
    shutil.copytree(run, tmp_path / "sim" / "server")
    assert cli_main(["-q", "export-adapter", str(tmp_path / "sim"), str(tmp_path / "adapter2")]) == 0
    assert (tmp_path / "adapter2/adapter_model.safetensors").read_bytes() == (
        tmp_path / "adapter/adapter_model.safetensors"
    ).read_bytes()

    cfg = parse_config(raw)
    base = build_model(family, "seq-cls", 2, seed=cfg.seed)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    split = build_split(cfg)
    edge, top = load_npz(run / FINAL_DIR / EDGE_FILE), load_npz(run / FINAL_DIR / TOP_FILE)
    apply_to_split(split, edge, top)
    trained = build_split(cfg).edge_factors()
    assert max(np.abs(edge[k] - trained[k]).max() for k in edge) > 1e-3  # the adapter is not the initial one
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(10, 100, (4, 12)))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids = ids * mask  # right padding with the pad id (0), as GPT-2 pooling in HF expects
    with torch.no_grad():
        want = split(ids, mask)
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    # and the split model with these factors is what the server evaluated
    assert app.rounds.stopped
