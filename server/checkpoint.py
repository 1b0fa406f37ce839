"""Crash-safe server checkpoints: a server killed at any moment restarts where the last round ended.

Two things are persisted, each written to a temporary name and moved into place with `os.replace`, so a
reader sees either the old or the new version, never half of one:

* `registry.json`, rewritten on every join and leave: the run id and, per client, its shard index, the
  SHA-256 of its session token and of its resume secret (never the secrets themselves: a leaked checkpoint
  does not let anyone in, yet an edge that kept them can go on after a restart).
* `pending/rNNNNNN-<client>.pt` for every adapter pushed to the open round NNNNNN (with the client's sfl-v1
  top adapter slot at that moment): a server that dies before the round closes counts it after a restart.
  Removed once a later round is checkpointed.
* `round-NNNNNN/` after every closed round (NNNNNN = the next round to run): edge and top strategy state
  (`state_io`), the top trainer (adapters + AdamW moments of every slot), RNG states, folded base deltas,
  the round metrics so far. The folder is built under a temporary name and renamed in one step; `LATEST`
  names the newest complete one. Older folders beyond `keep` are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitwave.server.aggregation.state_io import load_state, save_state

log = logging.getLogger(__name__)

REGISTRY = "registry.json"
LATEST = "LATEST"
FORMAT = "splitwave-checkpoint/1"


def token_digest(token: str) -> str:
    """SHA-256 of a secret (session token, resume secret): what is stored instead of it."""
    return hashlib.sha256(token.encode()).hexdigest()


def config_digest(cfg) -> str:
    """What a checkpoint's state depends on (not: server address, security, round count, output paths)."""
    keep = cfg.model_dump(
        mode="json", include={"seed", "num_clients", "model", "lora", "data", "training", "aggregation"}
    )
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Restored:
    """What a restarting server takes over from its checkpoint folder."""

    run_id: str
    clients: dict[str, dict] = field(default_factory=dict)  # client id -> {"token_sha256", "shard", "identity"}
    next_round: int = 0
    last_metrics: dict = field(default_factory=dict)
    round_dir: Path | None = None


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.dir, 0o700)  # holds token digests and model state
        except OSError:
            pass
        self.keep = keep

    # -- registry ------------------------------------------------------------------------------------------
    def save_registry(self, run_id: str, clients: dict[str, dict], config_sha256: str = "") -> None:
        blob = {"format": FORMAT, "run_id": run_id, "clients": clients, "config_sha256": config_sha256}
        _atomic_write(self.dir / REGISTRY, json.dumps(blob, sort_keys=True).encode())

    # -- adapters pushed to the open round -----------------------------------------------------------------
    def _pending_path(self, round_idx: int, client_id: str) -> Path:
        return self.dir / "pending" / f"r{round_idx:06d}-{client_id}.pt"

    def save_pending(
        self, round_idx: int, client_id: str, factors: dict, num_samples: float, metrics: dict, top_slot: dict | None
    ) -> None:
        path = self._pending_path(round_idx, client_id)
        path.parent.mkdir(exist_ok=True)
        buf = io.BytesIO()
        torch.save(
            {
                "round": round_idx,
                "client": client_id,
                "num_samples": float(num_samples),
                "metrics": dict(metrics),
                "top_slot": top_slot,
                "factors": {k: np.asarray(v) for k, v in factors.items()},
            },
            buf,
        )
        _atomic_write(path, buf.getvalue())

    def drop_pending(self, round_idx: int, client_id: str) -> None:
        self._pending_path(round_idx, client_id).unlink(missing_ok=True)

    def load_pending(self, round_idx: int) -> dict[str, dict]:
        """client id -> what `save_pending` stored for `round_idx`."""
        out = {}
        for p in sorted((self.dir / "pending").glob(f"r{round_idx:06d}-*.pt")):
            blob = torch.load(p, weights_only=False)  # our own file, written by save_pending
            if blob.get("round") == round_idx:
                out[blob["client"]] = blob
        return out

    def _prune_pending(self, next_round: int) -> None:
        for p in (self.dir / "pending").glob("r*.pt"):
            try:
                if int(p.name[1:7]) < next_round:
                    p.unlink(missing_ok=True)
            except ValueError:
                pass

    # -- rounds --------------------------------------------------------------------------------------------
    def save_round(
        self,
        next_round: int,
        *,
        strategy,
        top_strategy,
        trainer_state: dict,
        base_deltas: dict,
        last_metrics: dict,
        metrics_file: Path | None,
    ) -> Path:
        final = self.dir / f"round-{next_round:06d}"
        tmp = self.dir / f".tmp-round-{next_round:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_state(strategy, tmp / "edge_strategy.npz")
        if top_strategy is not None:
            save_state(top_strategy, tmp / "top_strategy.npz")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(
            {"trainer": trainer_state, "rng": rng, "base_deltas": {k: np.asarray(v) for k, v in base_deltas.items()}},
            tmp / "trainer.pt",
        )
        if metrics_file is not None and metrics_file.exists():
            shutil.copyfile(metrics_file, tmp / "server_metrics.jsonl")
        (tmp / "state.json").write_text(
            json.dumps({"format": FORMAT, "next_round": next_round, "last_metrics": last_metrics}, default=float)
        )
        for p in tmp.iterdir():  # the folder is complete on disk before it gets its real name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a redone round: replace the older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(self.dir / LATEST, final.name.encode())
        self._prune(final)
        self._prune_pending(next_round)
        return final

    def _prune(self, newest: Path) -> None:
        rounds = sorted(p for p in self.dir.glob("round-*") if p.is_dir())
        for p in rounds[: -self.keep]:
            if p != newest:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".tmp-round-*"):  # left by a crash while writing
            shutil.rmtree(p, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, config_sha256: str = "") -> Restored | None:
        """The state to resume from, or None for a fresh start (no registry yet). Refuses a checkpoint of a
        run with a different model/data/training config: its state would not fit, or silently mean something else."""
        reg_path = self.dir / REGISTRY
        if not reg_path.exists():
            return None
        reg = json.loads(reg_path.read_text())
        if reg.get("format") != FORMAT:
            raise ValueError(f"{reg_path}: unknown checkpoint format {reg.get('format')!r}")
        if config_sha256 and reg.get("config_sha256") and reg["config_sha256"] != config_sha256:
            raise ValueError(
                f"{self.dir} holds the checkpoint of a run with another config; use a new "
                f"server.checkpoint_dir (or the original config) to go on"
            )
        out = Restored(run_id=reg["run_id"], clients=reg["clients"])
        latest = self.dir / LATEST
        if latest.exists():
            rd = self.dir / latest.read_text().strip()
            if (rd / "state.json").exists():
                st = json.loads((rd / "state.json").read_text())
                out.next_round, out.last_metrics, out.round_dir = int(st["next_round"]), st["last_metrics"], rd
        return out

    @staticmethod
    def load_round(rd: Path, *, strategy, top_strategy) -> dict:
        """Load strategies in place; returns {"trainer", "base_deltas"} and restores the RNGs."""
        load_state(strategy, rd / "edge_strategy.npz")
        if top_strategy is not None:
            load_state(top_strategy, rd / "top_strategy.npz")
        blob = torch.load(rd / "trainer.pt", weights_only=False)  # our own file, written by save_round
        rng = blob["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        return blob
