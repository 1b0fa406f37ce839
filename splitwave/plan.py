"""`splitwave plan`: predict the per-round time of every cut layer for the configured links, pick the best.

Compute is profiled, not guessed: for each cut the torch split model (`server.setup.build_split` with that
cut) is timed on a real batch shape (batch_size x max_seq_len): the edge forward, the edge VJP (forward
recomputed + backward, as the recompute-mode ONNX edge does) and one server training step, by the
simulator's own timing code (splitwave.sim.costs.time_edge / time_server_step). Message sizes are the exact
serialized sizes of what the protocol would send (the tensor codec's frames in Train and PushAdapter
messages). Two predictions per cut:
  * `model_s`: channel.md section 5 (`round_latency_model`, mean link rates) plus the links' one-way
    latencies (one per message on the critical path);
  * `sim_s`: the virtual timeline of `splitwave.timeline` fed with the profile (FIFO server shared by all
    clients, link queues, fading/traces as configured): what `splitwave simulate` in virtual mode computes.
Note: torch on the server machine stands in for the edge runtime; scale with `--edge-slowdown` for a
slower device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from splitwave.channel import round_latency_model
from splitwave.channel.factory import rate_summary
from splitwave.common.config import ExperimentConfig
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import encode
from splitwave.protos.steps import build_step, grad_frames
from splitwave.runner import build_links
from splitwave.server.setup import build_split
from splitwave.server.torch_edge import TorchEdge
from splitwave.server.trainer import StepInput, TopTrainer
from splitwave.sim.costs import time_edge, time_server_step
from splitwave.timeline import CONTROL_REPLY_BYTES, CONTROL_REQUEST_BYTES, ClientRound, StepTimes, simulate_timeline

log = logging.getLogger(__name__)

HEADER_BYTES = 80  # session token, run id, round, step: what every message carries besides tensors


def message_sizes(cfg: ExperimentConfig, h: np.ndarray, factors: dict[str, np.ndarray]) -> dict[str, int]:
    """Serialized bytes per step up (h + mask + labels), per step down (grad_h) and of the adapter push."""
    tr = cfg.training
    b, s = h.shape[:2]
    hdr = pb.Header(session_token="x" * 43, run_id="r" * 12, round=1, step=1)

    def spec(name):
        return pb.CodecSpec(codec=name, topk_fraction=tr.topk_fraction if name == "topk" else 0.0)

    # full-length rows (no padding): a packed step saves nothing here but carries its row lengths
    sent = build_step(h, np.ones((b, s), np.int64), np.zeros(b, np.int64), spec(tr.codec_up), packed=tr.packed)
    up = sent.messages(pb.TrainRequest, hdr, {"edge_fwd_s": 0.01})
    down = [pb.TrainReply(header=hdr, frame=f) for f in grad_frames(h, sent.row_lengths, spec(tr.codec_down))]
    down.append(
        pb.TrainReply(header=hdr, end_step=pb.StepResult(loss=0.5, correct=1, count=b, metrics={"server_s": 0.01}))
    )
    up_codec, down_codec = tr.adapter_codec_up, tr.codec_adapter_down
    push = [pb.AdapterRequest(header=hdr, frame=f) for k, v in factors.items() for f in encode(k, v, up_codec)]
    bcast = [pb.RoundReply(header=hdr, factor=f) for k, v in factors.items() for f in encode(k, v, down_codec)]
    return {
        "act_bytes": sum(m.ByteSize() for m in up),
        "grad_bytes": sum(m.ByteSize() for m in down),
        "adapter_bytes": sum(m.ByteSize() for m in push) + 64,
        "broadcast_bytes": sum(m.ByteSize() for m in bcast),
    }


def profile_cut(cfg: ExperimentConfig, cut: int, reps: int = 5) -> dict:
    """Measured compute times (s) and message sizes (bytes) of one training step at `cut`, timed by the
    simulator's own timing code (splitwave.sim.costs) on the torch edge backend and the real server step."""
    torch.set_num_threads(1)  # an edge runs one thread (simulate starts them so); steadier timings too
    c = cfg.model_copy(deep=True)
    c.model.cut = cut
    split = build_split(c)
    b, s = cfg.training.batch_size, cfg.data.max_seq_len
    vocab = int(split.peft_model.config.vocab_size)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, vocab, (b, s), generator=g).numpy()
    mask = np.ones((b, s), dtype=np.int64)
    labels = np.zeros(b, np.int64) if cfg.model.task == "seq-cls" else ids.astype(np.int64)
    with torch.no_grad():
        h = split.edge(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    tr = cfg.training
    trainer = TopTrainer(split, cfg.model.task, lr=tr.optim.lr)
    t_srv = time_server_step(trainer, [StepInput(None, h, mask, labels)], reps)
    sizes = message_sizes(cfg, h, split.edge_factors())
    # after the server step: TorchEdge leaves only the edge factors trainable
    edge = time_edge(TorchEdge(split, lr=tr.optim.lr), ids, mask, reps)
    return {
        "cut": cut,
        "n_blocks": split.n_blocks,
        "t_edge_fwd": edge["forward"],
        "t_edge_bwd": edge["forward"] + edge["backward"],  # forward recomputed + backward, as recompute mode does
        "t_server": t_srv,
        **sizes,
    }


def predict(cfg: ExperimentConfig, prof: dict, edge_slowdown: float = 1.0) -> dict:
    """Round time predictions (s) for one profiled cut on the configured links."""
    E, K = cfg.training.local_steps, cfg.num_clients
    fwd, bwd = prof["t_edge_fwd"] * edge_slowdown, prof["t_edge_bwd"] * edge_slowdown
    links = build_links(cfg)
    ul = [rate_summary(p.uplink, 0.0, 10.0, 1001)["mean_bps"] for p in links]
    dl = [rate_summary(p.downlink, 0.0, 10.0, 1001)["mean_bps"] for p in links]
    m = round_latency_model(
        ul, dl, E, fwd, bwd, prof["t_server"], prof["act_bytes"], prof["grad_bytes"], prof["adapter_bytes"]
    )
    lat = [
        (E + 1) * (p.uplink.latency_s + p.uplink.jitter.mean)
        + (E + 1) * (p.downlink.latency_s + p.downlink.jitter.mean)
        for p in links
    ]
    model_s = max(t + lat_k for t, lat_k in zip(m["T_k"], lat)) + (m["T_round"] - max(m["T_k"]))
    # the simulated steady-state round (round 1: starts with a broadcast, like every round but the first)
    step = StepTimes(fwd, bwd, prof["t_server"], prof["act_bytes"], prof["grad_bytes"])
    cr = ClientRound(
        [step] * E, prof["adapter_bytes"], 0.0, CONTROL_REPLY_BYTES, CONTROL_REQUEST_BYTES, prof["broadcast_bytes"]
    )
    tl = simulate_timeline(build_links(cfg), [{k: cr for k in range(K)}] * 2, [0.0, 0.0])
    return {
        "model_s": model_s,
        "sim_s": tl[1].duration,
        "comm_share": max(m["comm_share"]),
        "mean_uplink_mbps": float(np.mean(ul)) / 1e6,
        "mean_downlink_mbps": float(np.mean(dl)) / 1e6,
        "breakdown": tl[1].breakdown,
    }


def plan(
    cfg: ExperimentConfig,
    cuts: list[int] | None = None,
    out: Path | None = None,
    reps: int = 10,
    edge_slowdown: float = 1.0,
    quiet: bool = False,
) -> dict:
    """Profile and predict every cut; print a table and the best cut; write plan.json."""
    if not cuts:
        n = build_split(cfg).n_blocks
        cuts = list(range(1, n))
    rows = []
    for cut in cuts:
        prof = profile_cut(cfg, cut, reps)
        rows.append({**prof, **predict(cfg, prof, edge_slowdown)})
    best = min(rows, key=lambda r: r["sim_s"])
    res = {
        "name": cfg.name,
        "num_clients": cfg.num_clients,
        "local_steps": cfg.training.local_steps,
        "batch": cfg.training.batch_size,
        "seq": cfg.data.max_seq_len,
        "codec_up": cfg.training.codec_up,
        "codec_down": cfg.training.codec_down,
        "edge_slowdown": edge_slowdown,
        "cuts": rows,
        "best_cut": best["cut"],
        "best_by_model": min(rows, key=lambda r: r["model_s"])["cut"],
    }
    out = Path(out) if out else Path(cfg.output_dir) / cfg.name / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    res["path"] = str(out)
    if not quiet:
        print(
            f"{'cut':>4} {'fwd ms':>8} {'vjp ms':>8} {'srv ms':>8} {'act KB':>9} {'grad KB':>9} "
            f"{'model s':>9} {'sim s':>9} {'comm':>6}"
        )
        for r in rows:
            print(
                f"{r['cut']:>4} {r['t_edge_fwd'] * 1e3:>8.2f} {r['t_edge_bwd'] * 1e3:>8.2f} {r['t_server'] * 1e3:>8.2f} "
                f"{r['act_bytes'] / 1e3:>9.1f} {r['grad_bytes'] / 1e3:>9.1f} {r['model_s']:>9.3f} {r['sim_s']:>9.3f} "
                f"{r['comm_share']:>6.0%}"
            )
        print(f"best cut: {best['cut']} (predicted round {best['sim_s']:.3f} s); plan written to {out}")
    return res
