"""Federated partitions: which example indices each client holds (IID or label-skewed), and how skewed they are.

Seeded with numpy's Generator only, so the server, every edge and a centralized reference compute the same
shards from the same (labels, num_clients, seed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def partition_iid(labels: np.ndarray | Sequence[int] | int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into `num_clients` shards whose sizes differ by at most one.

    `labels` may be the label array or just the dataset size. Each shard is sorted (order is the
    batcher's job).
    """
    n = int(labels) if isinstance(labels, (int, np.integer)) else len(labels)
    if num_clients <= 0 or num_clients > n:
        raise ValueError(f"need 1 <= num_clients <= {n}, got {num_clients}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): per class, shares over clients ~ Dirichlet(alpha).

    Small alpha -> each client sees few labels. Draws are repeated (same rng stream, so still
    deterministic) until every client has >= min_size examples; if that never happens within
    `max_tries`, samples are moved one by one from the largest client to the smallest, so no client is
    ever empty.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients <= 0 or num_clients * min_size > n:
        raise ValueError(f"cannot give {num_clients} clients >= {min_size} of {n} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _attempt in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            break
    else:
        logger.info("dirichlet(alpha=%g): no draw met min_size=%d in %d tries; rebalancing", alpha, min_size, max_tries)
        out = [rng.permutation(p) for p in out]
        while True:
            sizes = [len(p) for p in out]
            small = int(np.argmin(sizes))
            if sizes[small] >= min_size:
                break
            big = int(np.argmax(sizes))
            out[small] = np.append(out[small], out[big][-1])
            out[big] = out[big][:-1]
    return [np.sort(p).astype(np.int64) for p in out]


def partition_report(labels: np.ndarray, parts: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Per-client size and per-label counts, JSON-ready (plain ints, string label keys)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    report = []
    for k, idx in enumerate(parts):
        counts = {str(int(c)): int(np.sum(labels[idx] == c)) for c in classes}
        report.append({"client": k, "n": int(len(idx)), "label_counts": counts})
    return report


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> dict[str, float | int]:
    """Summary of non-IID-ness: total-variation distance of each client's label mix to the global mix.

    0 = identical to the global distribution; near 1 - (global share of one label) = single-label client.
    Also the mean share of each client's dominant label and the size spread.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    glob = np.array([np.mean(labels == c) for c in classes])
    tv, dom = [], []
    for idx in parts:
        cnt = np.array([np.sum(labels[idx] == c) for c in classes], dtype=np.float64)
        p = cnt / max(cnt.sum(), 1.0)
        tv.append(0.5 * np.abs(p - glob).sum())
        dom.append(p.max())
    sizes = np.array([len(p) for p in parts])
    return {
        "mean_tv": float(np.mean(tv)),
        "max_tv": float(np.max(tv)),
        "mean_dominant_share": float(np.mean(dom)),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }
