"""Many concurrent edges against one server: no deadlock, every pushed adapter counted, bounded memory.

The default test runs 32 clients for a few seconds with a deliberately small `max_workers` (the server
must size its pool for 32 clients' parked calls rather than deadlock); the slow one runs for 60 s.
"""

from __future__ import annotations

import functools

import pytest
from net_helpers import BUNDLE_CACHE, EDGE_CACHE

from splitwave import loadtest

# benchmarks/load.py's load, with the tests' caches
run_load = functools.partial(loadtest.run_load, bundle_cache=BUNDLE_CACHE, edge_cache=EDGE_CACHE)


def _check(res):
    print(res)
    assert not res["errors"], res["errors"]
    assert not res["deadlocked"]
    assert not res["adapters_lost"]
    assert res["rounds_closed"] >= 1 and res["adapters_counted"] >= res["clients"]
    assert not res["open_calls_after"]


def test_32_clients_short(tmp_path):
    res = run_load(32, duration_s=3.0, local_steps=2, run_dir=tmp_path, max_workers=4, min_rounds=1)
    _check(res)


@pytest.mark.slow
def test_32_clients_60s(tmp_path):
    res = run_load(32, duration_s=60.0, local_steps=5, run_dir=tmp_path)
    _check(res)
    assert res["rss_end_mb"] - res["rss_start_mb"] < 1024
