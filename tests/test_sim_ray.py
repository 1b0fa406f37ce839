"""The `ray` executor: the same results as the local one, on one machine and on a two-node cluster
(`ray.cluster_utils.Cluster`, two Ray nodes on this machine). Slow: Ray takes ~15 s to start."""

from __future__ import annotations

import pytest

from tests.test_sim_engine import _cfg, _digest, _run


@pytest.fixture(autouse=True)
def _ray_installed():
    """`make test-slow` installs the [ray] extra; a slow run without it fails rather than passing silently."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.fail("the Ray tests need the [ray] extra: pip install 'splitwave[ray]' (make test-slow does)")


@pytest.mark.slow
def test_ray_executor_gives_the_local_results(tmp_path):
    cfg = _cfg()
    ref = _digest(*_run(tmp_path, cfg)[:3])
    assert _digest(*_run(tmp_path, cfg, workers=2, executor="ray")[:3]) == ref


@pytest.mark.slow
def test_ray_two_node_cluster(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    import splitwave.sim.executors as ex

    cfg = _cfg()
    ref = _digest(*_run(tmp_path, cfg)[:3])
    nodes = []
    real_init = ex.RayPool.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        nodes.extend(self.nodes)

    monkeypatch.setattr(ex.RayPool, "__init__", init)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        got = _run(tmp_path, cfg, workers=2, executor="ray", ray_address=cluster.address)
        assert _digest(*got[:3]) == ref
        assert len(set(nodes)) == 2  # one edge actor on each node
    finally:
        ray.shutdown()
        cluster.shutdown()
