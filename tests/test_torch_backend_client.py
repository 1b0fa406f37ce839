"""The torch reference backend runs the same client loop as the ORT edge and gets the same result."""

from __future__ import annotations

import numpy as np
from net_helpers import ROOT

from splitwave.common.config import parse_config
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.server.app import SplitServer
from splitwave.server.service import start_server
from splitwave.server.torch_edge import torch_backend

RAW = {
    "num_clients": 1,
    "seed": 3,
    "model": {"family": "bert", "tiny": True, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 32, "max_seq_len": 16},
    "training": {"batch_size": 8, "local_steps": 3, "optim": {"lr": 0.01}},
    "rounds": {"num_rounds": 2},
}


def _run(tmp_path, backend):
    app = SplitServer(parse_config(RAW), tmp_path / backend, cache_dir=ROOT / ".cache/bundles")
    start = {k: v.copy() for k, v in app.global_edge_factors().items()}
    with start_server(app) as srv:
        opts = ClientOptions(name="e0", backend=backend, cache_dir=tmp_path / "cache")
        EdgeClient(srv.address, opts, make_backend=torch_backend if backend == "torch" else None).run()
    return start, app.global_edge_factors()


def test_torch_backend_equals_onnxruntime_backend(tmp_path):
    (start, ort), (start_ref, ref) = _run(tmp_path, "onnxruntime"), _run(tmp_path, "torch")
    assert set(ort) == set(ref) == set(start) and ort
    for k in start:
        np.testing.assert_array_equal(start[k], start_ref[k])
    # both backends trained: the factors moved well beyond the tolerance they are compared with
    assert min(float(np.abs(ort[k] - start[k]).max()) for k in ort) > 1e-3
    assert max(float(np.abs(ort[k] - ref[k]).max()) for k in ort) < 1e-5
