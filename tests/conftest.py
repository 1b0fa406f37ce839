"""Shared fixtures: exported edge bundles, built once per session and cached on disk by config hash.

Exporting a bundle takes ~25 s per tiny config, so every test module asks `edge_bundle(family)` and gets
the same export. The on-disk cache (.cache/bundles/<hash>) is keyed by the config and by the source of the
modules that shape the graphs, so editing them re-exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitwave.common.manifest import BundleManifest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SPLITWAVE_TEST_CACHE", ROOT / ".cache" / "bundles"))
_SOURCES = ("server/models.py", "server/split.py", "server/export.py")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Bundle:
    """A split model whose edge factors were randomized, plus its exported bundle directory."""

    split: object
    path: Path
    manifest: BundleManifest
    key: str


def make_split(family: str, task: str = "seq-cls", cut: int = 2, r: int = 4, alpha: float = 8.0, seed: int = 0):
    """Deterministic tiny split with non-zero random LoRA factors (B = 0 would zero the lora_A grads)."""
    import torch

    from splitwave.server.models import build_model
    from splitwave.server.split import LoraSpec, split_model

    split = split_model(build_model(family, task, seed=seed), cut, LoraSpec(r=r, alpha=alpha), task)
    g = torch.Generator().manual_seed(seed + 1)
    split.set_edge_factors(
        {k: (0.2 * torch.randn(v.shape, generator=g)).numpy() for k, v in split.edge_factors().items()}
    )
    split.set_server_factors(
        {k: (0.2 * torch.randn(v.shape, generator=g)).numpy() for k, v in split.server_factors().items()}
    )
    return split


def _config_key(cfg: dict) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for src in _SOURCES:
        h.update((ROOT / src).read_bytes())
    return h.hexdigest()[:16]


def require_shared(rel: str) -> Path:
    """A file of ../shared (data, traces) that a test needs: missing is a failure with the fix, never a skip,
    so a checkout without the shared folder cannot go green on fewer tests."""
    from splitwave.common.paths import SHARED_ENV, shared_dir

    path = shared_dir() / rel
    if not path.exists():
        pytest.fail(
            f"{path} is missing: these tests need the shared folder (datasets, traces) beside the "
            f"checkout as ../shared, or ${SHARED_ENV} pointing at it",
            pytrace=False,
        )
    return path


@pytest.fixture
def shared_data():
    """The shared data folder (fails the test, with how to fix it, when it is missing)."""
    return require_shared("data/sst2/train.tsv").parents[1]


@pytest.fixture
def shared_traces():
    """The shared traces folder (fails the test, with how to fix it, when it is missing)."""
    return require_shared("traces/Verizon-LTE-short.up").parent


@pytest.fixture(scope="session")
def edge_bundle():
    """edge_bundle(family, task="seq-cls", cut=2, modes=("recompute","saved")) -> Bundle (cached)."""
    from splitwave.server.export import export_bundle

    memo: dict[str, Bundle] = {}

    def get(family: str, task: str = "seq-cls", cut: int = 2, modes=("recompute", "saved")) -> Bundle:
        cfg = {"family": family, "task": task, "cut": cut, "modes": list(modes), "r": 4, "alpha": 8.0, "seed": 0}
        key = _config_key(cfg)
        if key in memo:
            return memo[key]
        split = make_split(family, task, cut)
        path = CACHE / f"{family}-{task}-cut{cut}-{key}"
        mpath = path / "manifest.json"
        if mpath.is_file():
            manifest = BundleManifest.from_file(mpath)
        else:
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = export_bundle(split, tmp, modes=modes, model_id=f"tiny-{family}")
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        memo[key] = Bundle(split, path, manifest, key)
        return memo[key]

    return get
