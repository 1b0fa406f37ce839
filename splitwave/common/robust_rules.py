"""What robust aggregation needs of a round, as a rule both the config check and the aggregator apply.

Torch-free and server-free so that `splitwave.common.config` can refuse a config at load time with the very
rule `splitwave.server.aggregation.robust.Combiner` enforces at aggregation time (one definition).
"""

from __future__ import annotations

import math

METHODS = ("mean", "median", "trimmed_mean")


def min_clients_for(method: str, trim_ratio: float = 0.1) -> int:
    """Fewest clients a round needs for `method` to differ from a plain mean, i.e. to outvote one bad client:
    the median needs 3 (with 2 it is their mean), the trimmed mean needs floor(trim_ratio * K) >= 1."""
    if method not in METHODS:
        raise ValueError(f"robust.method must be one of {METHODS}, got {method!r}")
    if method == "median":
        return 3
    if method == "trimmed_mean":
        if not isinstance(trim_ratio, (int, float)) or not 0.0 < trim_ratio < 0.5:
            raise ValueError(f"robust.trim_ratio must be in (0, 0.5) for trimmed_mean, got {trim_ratio!r}")
        k = 3
        while math.floor(trim_ratio * k) < 1:
            k += 1
        return k
    return 1
