"""Shared fixtures: exported edge bundles, built once per session and cached on disk by config hash.

Exporting a bundle takes ~25 s per tiny config, so every test module asks `edge_bundle(family)` and gets
the same export. The on-disk cache is the server's (`splitwave.server.setup.cached_bundle`, under
$SPLITWAVE_TEST_CACHE or .cache/bundles): keyed by the config and by the source of every module that
determines the bundle's bytes, so editing them re-exports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitwave.common.manifest import BundleManifest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SPLITWAVE_TEST_CACHE", ROOT / ".cache" / "bundles"))

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
    """edge_bundle(family, task="seq-cls", cut=2, modes=("recompute","saved"), quantize="none") -> Bundle (cached);
    quantize "int8": the int8 version of the same bundle (server/export/quantize.py)."""
    from splitwave.server.setup import cached_bundle  # lazy: torch-free tests load this conftest too

    memo: dict[str, Bundle] = {}

    def get(
        family: str, task: str = "seq-cls", cut: int = 2, modes=("recompute", "saved"), quantize: str = "none"
    ) -> Bundle:
        ident = {"family": family, "task": task, "cut": cut, "modes": list(modes), "r": 4, "alpha": 8.0, "seed": 0}
        memo_key = json.dumps({**ident, "quantize": quantize}, sort_keys=True)
        if memo_key in memo:
            return memo[memo_key]
        split = make_split(family, task, cut)
        path = cached_bundle(
            CACHE,
            ident,
            split,
            label=f"{family}-{task}-cut{cut}",
            quantize=quantize,
            modes=modes,
            model_id=f"tiny-{family}",
        )
        manifest = BundleManifest.from_file(path)
        memo[memo_key] = Bundle(split, path, manifest, path.name)
        return memo[memo_key]

    return get
