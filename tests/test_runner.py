"""The experiment runner: virtual time on synthetic records, a minimal real run (classification and causal
LM), process hygiene, and (slow) real-time vs virtual agreement."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitwave.channel import LinkPair, StaticLink
from splitwave.common.config import load_config
from splitwave.launch import ProcessGroup
from splitwave.runner import build_links, simulate
from splitwave.timeline import ClientRound, StepTimes, simulate_timeline

ROOT = Path(__file__).resolve().parents[1]


def _links():
    # 8 Mbit/s: one byte takes one microsecond; 10 ms one way
    return [LinkPair(StaticLink(8e6, 0.01), StaticLink(8e6, 0.01)) for _ in range(2)]


def test_virtual_time_matches_hand_computation():
    step = StepTimes(edge_fwd_s=0.1, edge_bwd_s=0.2, server_s=0.5, bytes_up=1000, bytes_down=2000)
    r0 = {k: ClientRound([step], push_bytes=8000, push_reply_bytes=32, await_request_bytes=64) for k in (0, 1)}
    r1 = {
        k: ClientRound([], push_bytes=8000, push_reply_bytes=32, await_request_bytes=64, broadcast_bytes=4000)
        for k in (0, 1)
    }
    tl = simulate_timeline(_links(), [r0, r1], [0.3, 0.3])
    # round 0: both activations arrive at 0.1 + 0.001 + 0.01 = 0.111; the server takes client 0 first
    # (0.111 -> 0.611), client 1 waits 0.5 s (0.611 -> 1.111); grads +0.012, backward 0.2, push +0.018
    c0, c1 = tl[0].per_client
    assert c0["push_arrival"] == pytest.approx(0.841)
    assert c1["push_arrival"] == pytest.approx(1.341)
    assert tl[0].critical_client == 1
    assert tl[0].close == pytest.approx(1.641) and tl[0].duration == pytest.approx(1.641)
    assert tl[0].breakdown == pytest.approx(
        {
            "edge_compute": 0.3,
            "uplink": 0.029,
            "server_wait": 0.5,
            "server_compute": 0.5,
            "downlink": 0.012,
            "aggregation": 0.3,
            "evaluation": 0.0,
        }
    )
    assert sum(tl[0].breakdown.values()) == pytest.approx(tl[0].duration)
    # round 1: client 0 already asked for work: broadcast at the close, 1.641 + 0.004 + 0.01 = 1.655, push
    # at 1.673. Client 1 (the last pusher) gets its push reply after the close (1.641 + 32 us + 10 ms), asks
    # (+64 us + 10 ms) = 1.661096, broadcast lands 1.675096, push 1.693096; close +0.3
    assert tl[1].per_client[0]["push_arrival"] == pytest.approx(1.673)
    assert tl[1].per_client[1]["push_arrival"] == pytest.approx(1.693096)
    assert tl[1].close == pytest.approx(1.993096)
    assert tl[1].duration == pytest.approx(1.993096 - 1.641)
    assert sum(tl[1].breakdown.values()) == pytest.approx(tl[1].duration)


def test_evaluation_is_its_own_part_of_the_close():
    step = StepTimes(edge_fwd_s=0.1, edge_bwd_s=0.2, server_s=0.5, bytes_up=1000, bytes_down=2000)
    r0 = {k: ClientRound([step], push_bytes=8000, push_reply_bytes=32, await_request_bytes=64) for k in (0, 1)}
    plain = simulate_timeline(_links(), [r0], [0.3])[0]
    split = simulate_timeline(_links(), [r0], [0.3], [0.2])[0]
    assert split.breakdown["evaluation"] == pytest.approx(0.2)
    assert split.breakdown["aggregation"] == pytest.approx(0.1)
    assert split.duration == pytest.approx(plain.duration) == pytest.approx(sum(split.breakdown.values()))
    # a measured eval longer than the estimated close time cannot make aggregation negative
    over = simulate_timeline(_links(), [r0], [0.3], [0.5])[0]
    assert over.breakdown["evaluation"] == pytest.approx(0.3) and over.breakdown["aggregation"] == 0.0


def _children(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(p.name))
    return out


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_simulate_minimal_virtual_run(tmp_path, caplog):
    """channel.mode virtual runs on the simulation engine: the run folder as before plus devices.json, no
    child process, nobody else's process touched, and a metrics.jsonl without wall-clock values."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        before = _children(os.getpid())
        cfg = load_config(
            ROOT / "configs" / "quick.yaml",
            [
                "num_clients=2",
                "rounds.num_rounds=2",
                "training.local_steps=3",
                "channel.mode=virtual",
                f"output_dir={tmp_path}",
            ],
        )
        with caplog.at_level(logging.INFO, logger="splitwave.runner"):
            run_dir = simulate(cfg, progress=False)
        assert any(r.getMessage().startswith("phase simulation") for r in caplog.records)
        assert run_dir.parent == tmp_path / "quick"
        for f in ("config.yaml", "links.json", "devices.json", "metrics.jsonl", "summary.json"):
            assert (run_dir / f).stat().st_size > 0
        for f in ("accuracy.png", "bytes.png", "latency.png"):
            assert (run_dir / f).read_bytes()[:4] == b"\x89PNG"
        assert load_config(run_dir / "config.yaml").num_clients == 2  # resolved, loadable
        assert len(json.loads((run_dir / "devices.json").read_text())) == 2
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in recs] == [0, 1]
        for r in recs:
            assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and 0 <= r["eval_accuracy"] <= 1
            assert r["sim_round_s"] == pytest.approx(sum(r["breakdown"].values()))
            assert r["breakdown"]["uplink"] > 0 and "real_round_s" not in r
            assert r["breakdown"]["evaluation"] > 0 and r["server_eval_s"] == r["breakdown"]["evaluation"]
        assert 0 <= recs[0]["pre_eval_accuracy"] <= 1  # the model before training, measured by the server
        s = json.loads((run_dir / "summary.json").read_text())
        assert s["mode"] == "virtual" and s["rounds"] == 2
        assert s["final_accuracy"] == recs[-1]["eval_accuracy"]
        assert s["total_bytes_up"] == sum(r["bytes_up"] for r in recs)
        assert s["total_sim_time_s"] == pytest.approx(recs[-1]["sim_time_s"])
        assert s["wall_time_s"] > 0 and s["engine"]["client_steps"] == 2 * 2 * 3
        # no orphans, and nobody else's process touched
        assert bystander.poll() is None
        assert _children(os.getpid()) == before
        assert _procs_mentioning(str(run_dir)) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_simulate_causal_lm_e2e_run_learns(tmp_path):
    """configs/e2e-gpt2-tiny.yaml, shortened: a causal-LM run over gRPC finishes, writes its results, and its
    eval loss (per labelled token) falls."""
    cfg = load_config(
        ROOT / "configs" / "e2e-gpt2-tiny.yaml",
        [
            "rounds.num_rounds=3",
            "training.local_steps=4",
            "data.num_train=256",
            "data.num_eval=64",
            f"output_dir={tmp_path}",
        ],
    )
    run_dir = simulate(cfg, progress=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    losses = [r["eval_loss"] for r in recs]
    for r in recs:
        assert 0 <= r["eval_accuracy"] <= 1 and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["bytes_up"] > 0 and r["sim_round_s"] > 0
    assert losses[-1] < losses[0] - 0.05, losses
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["final_loss"] == losses[-1] and s["final_perplexity"] == recs[-1]["eval_perplexity"]
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_process_group_stop_ends_children_and_their_children(tmp_path):
    pg = ProcessGroup()
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    p = pg.start("a", [sys.executable, "-c", code], tmp_path / "a.log")
    time.sleep(0.5)
    grandchildren = _children(p.pid)
    assert grandchildren
    t0 = time.monotonic()
    pg.stop(grace_s=3)
    assert p.poll() is not None and time.monotonic() - t0 < 10
    time.sleep(0.2)
    assert not any(
        Path(f"/proc/{g}").exists() and "Z" not in Path(f"/proc/{g}/stat").read_text().split()[2] for g in grandchildren
    )


@pytest.mark.slow
def test_virtual_agrees_with_realtime_and_is_faster(tmp_path):
    """benchmarks/virtual_vs_realtime.py, run as it is run by hand."""
    results = tmp_path / "virtual_vs_realtime.json"
    bench = [sys.executable, str(ROOT / "benchmarks" / "virtual_vs_realtime.py")]
    out = subprocess.run(
        [*bench, "--out", str(tmp_path / "runs"), "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(results.read_text())
    assert res["agreement_cross_run"]["max_abs_rel_err"] < 0.05
    assert res["agreement_same_run_replay"]["max_abs_rel_err"] < 0.05
    assert res["wall_speedup"] >= 5


def test_wireless_config_replay_answers_at_the_time_that_hung():
    """The issue's run: sst2-minilm-wireless's links asked at t = 256.58 s (a 10 ms block boundary that
    t / T_c rounds below), inside the virtual-time replay; it hung after training before the fix."""
    cfg = load_config(ROOT / "configs" / "sst2-minilm-wireless.yaml")
    links = build_links(cfg)
    step = StepTimes(edge_fwd_s=0.05, edge_bwd_s=0.05, server_s=0.1, bytes_up=589_875, bytes_down=1_179_698)
    rounds = [
        {
            k: ClientRound(
                [step] * 2, push_bytes=98_304, push_reply_bytes=32, await_request_bytes=64, broadcast_bytes=98_304
            )
            for k in range(cfg.num_clients)
        }
    ]
    for pair in links:
        for link in (pair.uplink, pair.downlink):
            assert link.done(1_179_698, 256.58) > 256.58
    # and a replay whose second round starts after a 256.58 s close (round 0 carries it)
    tl = simulate_timeline(links, rounds * 2, [256.58, 0.5])
    assert tl[1].close > tl[0].close > 256.58
