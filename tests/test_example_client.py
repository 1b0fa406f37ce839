"""The README's integration example (stubs + numpy only) trains against a live server."""

from __future__ import annotations

import re
import subprocess
import sys

from net_helpers import ROOT

from splitwave.common.config import parse_config
from splitwave.launch import child_env
from splitwave.server.app import SplitServer
from splitwave.server.service import start_server

CFG = {
    "num_clients": 1,
    "seed": 3,
    "model": {"family": "bert", "tiny": True, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 32, "max_seq_len": 16},
    "training": {"batch_size": 8, "local_steps": 3},
    "rounds": {"num_rounds": 2},
}


def test_example_client_runs_training_steps(tmp_path):
    app = SplitServer(parse_config(CFG), tmp_path / "run", cache_dir=ROOT / ".cache/bundles")
    with start_server(app) as srv:
        before = app.trainer.factors()
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples/minimal_client.py"), srv.address, "3"],
            env=child_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        steps = re.findall(r"step (\d+): loss ([0-9.]+), \|grad_h\| ([0-9.e+-]+)", out.stdout)
        assert [s for s, _, _ in steps] == ["0", "1", "2"]
        assert all(float(g) > 0 for _, _, g in steps)
        after = app.trainer.factors()
        assert any(abs(after[k] - before[k]).max() > 0 for k in before)  # the server really trained on them
        assert "example" not in app.by_client  # it left
