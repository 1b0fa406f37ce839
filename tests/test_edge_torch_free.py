"""The edge runtime runs a bundle with torch, transformers and peft made impossible to import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = r"""
import sys
class _Block:
    BANNED = ("torch", "transformers", "peft", "functorch")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BANNED:
            raise ImportError(f"{name} is blocked on the edge")
        return None
sys.meta_path.insert(0, _Block())
"""

SCRIPT = (
    BLOCKER
    + r"""
import json, sys
import numpy as np
sys.path.insert(0, ROOT)
import splitwave.edge, splitwave.edge.runtime, splitwave.edge.optim
from splitwave.edge.runtime import EdgeRuntime
out = {}
for mode in ("recompute", "saved"):
    rt = EdgeRuntime(BUNDLE, mode=mode, threads=1, lr=1e-2)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(2, 5)).astype(np.int64)
    mask = np.ones_like(ids); mask[1, 3:] = 0
    before = {k: v.copy() for k, v in rt.factors.items()}
    h = rt.forward(ids, mask)
    grads = rt.backward(np.ones_like(h))
    rt.step(grads)
    changed = sum(not np.array_equal(before[k], rt.factors[k]) for k in before)
    out[mode] = {"h": list(h.shape), "n_grads": len(grads), "changed": changed}
try:
    import torch  # noqa: F401
    out["torch_importable"] = True
except ImportError:
    out["torch_importable"] = False
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print(json.dumps(out))
"""
)


def test_edge_runs_without_torch(edge_bundle):
    b = edge_bundle("bert")
    code = SCRIPT.replace("ROOT", repr(str(ROOT))).replace("BUNDLE", repr(str(b.path)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    n = len(b.manifest.factors)
    for mode in ("recompute", "saved"):
        assert out[mode] == {"h": [2, 5, b.manifest.hidden_size], "n_grads": n, "changed": n}
    assert out["torch_importable"] is False
    assert out["loaded"] == []
