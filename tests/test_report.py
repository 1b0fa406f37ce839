"""Plots of a run from synthetic records (no processes): files written, critical client named."""

from __future__ import annotations

from splitwave.report import critical_summary, plot
from splitwave.timeline import PARTS


def _recs(n=3, critical=("client-1",) * 3):
    out = []
    for r in range(n):
        bd = {p: 0.1 * (i + 1) for i, p in enumerate(PARTS)}
        out.append(
            {
                "round": r,
                "eval_accuracy": 0.5 + 0.1 * r,
                "sim_time_s": 2.0 * (r + 1),
                "bytes_up": 1e6,
                "bytes_down": 2e6,
                "breakdown": bd,
                "real_round_s": sum(bd.values()),
                "critical_client": critical[r],
            }
        )
    out[0]["pre_eval_accuracy"] = 0.45
    return out


def test_critical_client_summary():
    assert critical_summary(_recs()) == "client-1"
    assert (
        critical_summary(_recs(critical=("client-1", "client-0", "client-1")))
        == "client-1 (rounds 1, 3), client-0 (round 2)"
    )


def test_plots_written_with_and_without_a_channel_model(tmp_path):
    assert plot(tmp_path, _recs(), "t") == ["accuracy.png", "bytes.png", "latency.png"]
    recs = _recs()
    for r in recs:
        r["breakdown"] = None
        r.pop("pre_eval_accuracy", None)
    (tmp_path / "b").mkdir()
    assert len(plot(tmp_path / "b", recs, "t")) == 3
    for d in (tmp_path, tmp_path / "b"):
        for f in ("accuracy.png", "bytes.png", "latency.png"):
            assert (d / f).read_bytes()[:4] == b"\x89PNG"
