"""The server's plain logic: sessions, the edge bundle, split steps, rounds and evaluation.

The gRPC servicer (`server/service.py`) only decodes messages and calls this object, so everything here is
testable without a network. Errors are raised as `ServiceError(code, message)` with a gRPC status name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitwave.common.config import ConfigError, ExperimentConfig
from splitwave.common.data import IGNORE_INDEX
from splitwave.common.shard import build_token_dataset, partition
from splitwave.server import compute
from splitwave.server.aggregation.registry import make_strategy
from splitwave.server.checkpoint import Checkpointer, config_digest, token_digest
from splitwave.server.errors import ServiceError
from splitwave.server.evaluation import evaluate
from splitwave.server.models import build_model, minilm_path
from splitwave.server.rounds import Assignment, RoundManager, RoundRecord
from splitwave.server.split import LoraSpec, split_model
from splitwave.server.trainer import TopTrainer

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Session:
    client_id: str
    token: str
    shard_index: int
    num_samples: int
    joined_at: float
    last_step: dict[int, int] = field(default_factory=dict)  # round -> last step trained
    base_version: int = 0  # version of the folded base-weight deltas this client has been sent
    last_reply: tuple | None = None  # (round, step, inputs, result) of the last step: replayed to honest retries
    identity: str = ""  # mTLS certificate identity the session is bound to ("" without client certificates)
    resumed: bool = False  # restored from a checkpoint: rounds restart at step 0 and need training before a push
    resume_digest: str = ""  # SHA-256 of the resume secret a rejoin under this name must present
    trained: bool = False  # has trained at least one step (a slot of a client that never does may be freed)
    round_mark: dict = field(default_factory=dict)  # round -> top adapter state before this session's first step
    round_steps: dict[int, int] = field(default_factory=dict)  # round -> server steps this session took in it
    lock: threading.Lock = field(default_factory=threading.Lock)


def model_source(cfg: ExperimentConfig) -> str:
    return minilm_path() if cfg.model.family == "minilm" else cfg.model.family


def tokenizer_source(cfg: ExperimentConfig) -> str | None:
    """Folder of the tokenizer that encodes the run's text data (it goes into the bundle), or None."""
    return minilm_path() if cfg.model.family == "minilm" or cfg.model.tokenizer == "minilm" else None


def model_vocab_size(cfg: ExperimentConfig) -> int | None:
    """A tiny model's vocabulary: model.vocab_size, else the tokenizer's; None: the model's own / tiny default."""
    tok = tokenizer_source(cfg) if cfg.model.tiny else None
    if tok is None:
        return cfg.model.vocab_size
    from splitwave.common.tokenizer import Tokenizer

    need = Tokenizer.from_dir(tok).vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {need} ids of tokenizer "
            f"{cfg.model.tokenizer!r}"
        )
    return cfg.model.vocab_size or need


def build_split(cfg: ExperimentConfig):
    """The split model every party derives from the config (same seed: same weights, same LoRA init)."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        model_source(cfg),
        cfg.model.task,
        cfg.model.num_labels,
        seed=cfg.seed,
        vocab_size=model_vocab_size(cfg),
        init_std=cfg.model.init_std,
    )
    lora = LoraSpec(
        r=cfg.lora.r, alpha=cfg.lora.alpha, targets=cfg.lora.targets, dropout=cfg.lora.dropout, rslora=cfg.lora.rslora
    )
    return split_model(model, cfg.model.cut, lora, cfg.model.task)


def bundle_key(cfg: ExperimentConfig) -> str:
    """What determines the bundle's bytes: model, cut, LoRA, seed and the code that builds, splits and exports the
    model (not training settings)."""
    here = Path(__file__).parent
    code = b"".join((here / f).read_bytes() for f in ("export.py", "models.py", "split.py"))
    exporter = hashlib.sha256(code).hexdigest()[:12]
    ident = {"model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(), "seed": cfg.seed, "exporter": exporter}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def ensure_bundle(cfg: ExperimentConfig, split, cache_dir: Path) -> Path:
    """Export the edge bundle once per (model, cut, LoRA, seed); later runs reuse it from the cache."""
    from splitwave.server.export import export_bundle

    target = cache_dir / bundle_key(cfg)
    if (target / "manifest.json").exists():
        log.info("edge bundle found in the cache (%s)", target)
        return target
    log.info(
        "first start of this model/cut/LoRA: exporting the edge bundle (ONNX graphs + weights) to %s; "
        "this takes a minute or more, and later starts reuse it",
        target,
    )
    t0 = time.perf_counter()
    tmp = cache_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tok = tokenizer_source(cfg)
    flags = {id(p): p.requires_grad for p in split.peft_model.parameters()}
    try:
        export_bundle(
            split, tmp, model_id=cfg.model.family if cfg.model.tiny else "all-MiniLM-L6-v2", tokenizer_dir=tok
        )
    finally:
        for p in split.peft_model.parameters():
            p.requires_grad_(flags[id(p)])
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["source"] = {
        "family": cfg.model.family,
        "tiny": cfg.model.tiny,
        "num_labels": cfg.model.num_labels,
        "seed": cfg.seed,
        "vocab_size": model_vocab_size(cfg),
        "init_std": cfg.model.init_std,
    }  # what the torch reference backend rebuilds
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process exported it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("edge bundle exported in %.1f s", time.perf_counter() - t0)
    return target


EVAL_SPLITS = {"sst2": "dev", "ag_news": "test", "e2e": "valid", "synthetic": "eval"}  # split "eval" of each


def data_spec(cfg: ExperimentConfig, split: str, vocab_size: int) -> dict:
    """What an edge rebuilds its data from (sent as JSON at Join); split: "train" or "eval"."""
    limit = cfg.data.num_train if split == "train" else cfg.data.num_eval
    return {
        "dataset": cfg.data.dataset,
        "split": split if split == "train" else EVAL_SPLITS[cfg.data.dataset],
        "limit": limit,
        "seed": cfg.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "vocab_size": vocab_size,
        "num_labels": cfg.model.num_labels,
        "task": cfg.model.task,
    }


def checked_float32(name: str, arr: np.ndarray, bound: float) -> np.ndarray:
    """`arr` as float32, refused unless every value is finite and |value| <= bound AFTER the cast: a float64
    1e300 is finite on the wire but inf in float32, where it would reach the model."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(arr, dtype=np.float32)
        top = float(np.max(np.abs(out), initial=0.0))
    if not np.isfinite(top):
        raise ServiceError("INVALID_ARGUMENT", f"{name} has NaN or Inf values (as float32)")
    if top > bound:
        raise ServiceError(
            "INVALID_ARGUMENT", f"{name} has |value| {top:.3g} > {bound:g} (server.security.max_abs_value)"
        )
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SplitServer:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, cache_dir: Path = Path(".cache/bundles")):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:12]
        if cfg.server.checkpoint_dir:  # fail fast on a checkpoint of another config, before building anything
            Checkpointer(cfg.server.checkpoint_dir).load(config_digest(cfg))
        t0 = time.perf_counter()
        self.split = compute.run(build_split, cfg)
        self.bundle_dir = compute.run(ensure_bundle, cfg, self.split, Path(cache_dir))
        self.manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
        self.bundle_files = self._index_bundle()
        self.bundle_hash = hashlib.sha256(
            json.dumps(sorted((n, s) for n, (_, s, _) in self.bundle_files.items())).encode()
        ).hexdigest()[:32]
        log.info("model and bundle ready in %.1f s (%s)", time.perf_counter() - t0, self.bundle_dir)

        tr = cfg.training
        self.trainer = TopTrainer(
            self.split,
            cfg.model.task,
            lr=tr.optim.lr,
            weight_decay=tr.optim.weight_decay,
            betas=tr.optim.betas,
            eps=tr.optim.eps,
            personal=tr.mode == "sfl-v1",
            server_batch=tr.server_batch,
            server_batch_wait_s=tr.server_batch_wait_ms / 1e3,
        )
        self.strategy = self._make_strategy("edge")
        self.strategy.initialize(self.split.edge_factors())
        self.top_strategy = None
        if tr.mode == "sfl-v1":
            self.top_strategy = self._make_strategy("top")
            self.top_strategy.initialize(self.trainer.factors())

        vocab = int(self.split.peft_model.config.vocab_size)
        tok_dir = self.bundle_dir if self.manifest.get("tokenizer_files") else None
        self.train_spec = data_spec(cfg, "train", vocab)
        self.eval_spec = data_spec(cfg, "eval", vocab)
        # the arrays every edge rebuilds from train_spec (kept: the simulation engine's clients read theirs here)
        self.train_data = train = build_token_dataset(self.train_spec, tok_dir)
        self.shards = partition(
            train,
            cfg.num_clients,
            cfg.data.partition,
            cfg.data.dirichlet_alpha,
            cfg.seed,
            min_size=cfg.training.batch_size,
        )
        self.eval_data = build_token_dataset(self.eval_spec, tok_dir)

        self.base_deltas_total: dict[str, np.ndarray] = {}  # module -> running sum, torch weight layout
        self.base_version = 0
        self.sessions: dict[str, Session] = {}
        self.by_client: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.metrics_path = self.run_dir / "server_metrics.jsonl"
        self.metrics_path.write_text("")  # a run's own rounds only (a resumed run copies the checkpoint's lines)
        self.meter = None  # set by the transport (protos.metering.ByteMeter)
        self._restored: dict[str, Session] = {}  # token digest -> session of a client not yet back after a restart
        self._pending_reports: dict = {}  # adapters pushed to the open round before a restart (see _resume)
        self.checkpointer = Checkpointer(cfg.server.checkpoint_dir) if cfg.server.checkpoint_dir else None
        start_round, last_metrics = self._resume() if self.checkpointer else (0, {})
        # the global model before any training: round 0's line carries it (the accuracy curve's first point)
        self.pre_eval = self._timed_eval() if start_round == 0 else None
        self.rounds = RoundManager(
            self.strategy,
            num_rounds=cfg.rounds.num_rounds,
            expected_clients=cfg.num_clients,
            fraction=cfg.rounds.fraction,
            min_clients=cfg.rounds.min_clients,
            deadline_s=cfg.rounds.deadline_s,
            sequential=tr.mode == "sl",
            seed=cfg.seed,
            on_close=self._on_close,
            start_round=start_round,
            registered=sorted(self.by_client) or None,
            last_metrics=last_metrics,
            on_checkpoint=self._checkpoint if self.checkpointer else None,
            max_metrics_entries=cfg.server.security.max_metrics_entries,
            max_metric_name_bytes=cfg.server.security.max_metric_name_bytes,
        )
        if self._pending_reports:
            self.rounds.preload(start_round, self._pending_reports)
        if self.checkpointer:
            self._save_registry()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _resume(self) -> tuple[int, dict]:
        """Take over run id, clients and the state after the last completed round from the checkpoint."""
        got = self.checkpointer.load(config_digest(self.cfg))
        if got is None:
            return 0, {}
        self.run_id = got.run_id
        for cid, c in got.clients.items():
            s = Session(
                cid,
                "",
                int(c["shard"]),
                len(self.shards[int(c["shard"])]),
                time.time(),
                identity=c.get("identity", ""),
                resumed=True,
                resume_digest=c.get("resume_sha256", ""),
                trained=bool(c.get("trained", True)),
            )
            self._restored[c["token_sha256"]] = s
            self.by_client[cid] = s
        if got.round_dir is not None:
            blob = Checkpointer.load_round(got.round_dir, strategy=self.strategy, top_strategy=self.top_strategy)
            self.trainer.load_state_dict(blob["trainer"])
            if blob["base_deltas"]:
                self._fold_base_deltas(blob["base_deltas"])
            saved_metrics = got.round_dir / "server_metrics.jsonl"
            if saved_metrics.exists():  # drop lines of rounds that ran after the checkpoint
                shutil.copyfile(saved_metrics, self.metrics_path)
        pending = {c: b for c, b in self.checkpointer.load_pending(got.next_round).items() if c in got.clients}
        for c, b in pending.items():  # sfl-v1: the top adapter slot as it was when the client pushed
            if b["top_slot"] is not None and self.trainer.personal:
                self.trainer.restore_slot(c, b["top_slot"], 0)
        self._pending_reports = {c: (b["factors"], b["num_samples"], b["metrics"]) for c, b in pending.items()}
        log.info(
            "resumed run %s from %s: next round %d, %d clients, %d adapters already pushed to it",
            self.run_id,
            self.checkpointer.dir,
            got.next_round,
            len(got.clients),
            len(pending),
        )
        return got.next_round, got.last_metrics

    def _save_registry(self) -> None:
        clients = {}
        for s in self.by_client.values():
            digest = token_digest(s.token) if s.token else next(d for d, r in self._restored.items() if r is s)
            clients[s.client_id] = {
                "token_sha256": digest,
                "shard": s.shard_index,
                "identity": s.identity,
                "resume_sha256": s.resume_digest,
                "trained": s.trained,
            }
        self.checkpointer.save_registry(self.run_id, clients, config_digest(self.cfg))

    def _checkpoint(self, next_round: int, last_metrics: dict) -> None:
        """Called by the round manager after a round closed and before the next opens."""
        t0 = time.perf_counter()
        path = self.checkpointer.save_round(
            next_round,
            strategy=self.strategy,
            top_strategy=self.top_strategy,
            trainer_state=self.trainer.state_dict(),
            base_deltas=self.base_deltas_total,
            last_metrics={k: v for k, v in last_metrics.items() if isinstance(v, (int, float))},
            metrics_file=self.metrics_path,
        )
        log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - t0)

    def _make_strategy(self, scope: str):
        agg = self.cfg.aggregation
        return make_strategy(
            agg.strategy,
            lora_alpha=self.cfg.lora.alpha,
            use_rslora=self.cfg.lora.rslora,
            fan_in_fan_out=self.split.family == "gpt2",
            robust=agg.robust,
            dp=agg.dp,
            server_opt=agg.server_opt,
            scope=scope,
            **{"max_abs_value": self.cfg.server.security.max_abs_value, **agg.params},
        )

    def _index_bundle(self) -> dict[str, tuple[Path, str, int]]:
        files = {}
        for p in sorted(self.bundle_dir.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(self.bundle_dir))] = (p, _file_sha256(p), p.stat().st_size)
        return files

    # -- sessions ------------------------------------------------------------------------------------------
    def join(
        self,
        client_name: str,
        enrollment_secret: str,
        backend: str,
        codecs: list[str],
        training_modes: list[str],
        protocol_version: int,
        identity: str = "",
        resume_secret: str = "",
        identity_names: tuple[str, ...] = (),
    ) -> tuple[Session, int, str]:
        """Returns (session, open round, resume secret). `identity` is the peer's client-certificate identity
        under mTLS and `identity_names` every name of that certificate (CN, SANs): the client name must be one
        of them. Without a certificate, a rejoin under a name that has a session must present that session's
        resume secret (the enrollment secret proves membership, not identity)."""
        sec = self.cfg.server.security
        if identity and not identity_names:
            identity_names = (identity,)
        if not client_name and identity:
            client_name = identity
        if client_name and not CLIENT_NAME.fullmatch(client_name):
            raise ServiceError("INVALID_ARGUMENT", "client_name must be 1-64 characters of [A-Za-z0-9._-]")
        if identity_names and client_name not in identity_names:
            raise ServiceError(
                "PERMISSION_DENIED",
                f"client name {client_name!r} is not the name of the client "
                f"certificate ({', '.join(identity_names)[:200]})",
            )
        if protocol_version not in (0, PROTOCOL_VERSION):
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"protocol version {protocol_version} unsupported (server speaks {PROTOCOL_VERSION})",
            )
        if sec.enrollment_secret and not secrets.compare_digest(
            enrollment_secret.encode(), sec.enrollment_secret.encode()
        ):
            raise ServiceError("UNAUTHENTICATED", "wrong enrollment secret")
        if sec.allow_list is not None and client_name not in sec.allow_list:
            raise ServiceError("PERMISSION_DENIED", f"client {client_name!r} is not on the allow list")
        tr = self.cfg.training
        need = {c for c in (tr.codec_up, tr.codec_down) if c != "raw"}
        if codecs and not need <= set(codecs):
            raise ServiceError("FAILED_PRECONDITION", f"client lacks codecs {sorted(need - set(codecs))}")
        if training_modes and tr.edge_mode not in training_modes:
            raise ServiceError("FAILED_PRECONDITION", f"client cannot train in mode {tr.edge_mode!r}")
        evicted: list[Session] = []
        with self._lock:
            # an anonymous client gets a fresh name: never one that would take over another client's session
            name = client_name or next(
                f"edge-{i}" for i in range(len(self.by_client) + 1) if f"edge-{i}" not in self.by_client
            )
            old = self.by_client.get(name)
            if old is not None:  # a rejoin after a crash: new token, same shard
                self._check_rejoin(old, identity, resume_secret)
                self.sessions.pop(old.token, None)
                self._restored = {d: r for d, r in self._restored.items() if r is not old}
                shard = old.shard_index
                secret = resume_secret or secrets.token_urlsafe(32)  # mTLS rejoins may come without one
            else:
                shard, evicted = self._free_slot()
                secret = secrets.token_urlsafe(32)
            s = Session(
                name,
                secrets.token_urlsafe(32),
                shard,
                len(self.shards[shard]),
                time.time(),
                identity=identity,
                resumed=old is not None and old.resumed,
                resume_digest=token_digest(secret),
                trained=old is not None and old.trained,
            )
            self.sessions[s.token] = s
            self.by_client[name] = s
            if self.checkpointer:
                self._save_registry()
        for e in evicted:
            self.rounds.unregister(e.client_id)
        if old is not None:
            self._rollback_abandoned(old)
        self.rounds.register(name)
        log.info(
            "client %s %s (shard %d, %d samples)",
            name,
            "rejoined" if old is not None else "joined",
            shard,
            s.num_samples,
        )
        return s, self.rounds.round_idx, secret

    def _check_rejoin(self, old: Session, identity: str, resume_secret: str) -> None:
        """A name that has a session is taken: only the same certificate, or its resume secret, gets it back."""
        if old.identity:
            if old.identity != identity:
                raise ServiceError(
                    "PERMISSION_DENIED", f"client id {old.client_id!r} is bound to another client certificate"
                )
            return
        if not resume_secret:
            raise ServiceError(
                "PERMISSION_DENIED",
                f"client name {old.client_id!r} is taken; rejoining under it "
                f"needs the resume secret of its earlier Join",
            )
        if not old.resume_digest or not secrets.compare_digest(token_digest(resume_secret), old.resume_digest):
            raise ServiceError("PERMISSION_DENIED", f"wrong resume secret for client {old.client_id!r}")

    def _unused_since(self, s: Session, now: float) -> float:
        """Seconds a client has held a slot without training while a round wanted it (0: not unused)."""
        if s.trained:
            return 0.0
        since = self.rounds.selected_since(s.client_id)
        if since is None:
            return 0.0
        return min(now - s.joined_at, time.monotonic() - since)

    def _free_slot(self) -> tuple[int, list[Session]]:
        """A shard nobody holds; else the slot of the client that has held one longest without ever training
        while selected (after `server.limits.unused_slot_s`). Called with the lock held."""
        used = {s.shard_index for s in self.by_client.values()}
        free = [i for i in range(len(self.shards)) if i not in used]
        if free:
            return free[0], []
        limit = self.cfg.server.limits.unused_slot_s
        now = time.time()
        idle = sorted(
            ((self._unused_since(s, now), s) for s in self.by_client.values() if not s.trained), key=lambda x: -x[0]
        )
        if idle and idle[0][0] >= limit:
            victim = idle[0][1]
            log.warning("client %s held a slot for %.0f s without training: slot freed", victim.client_id, idle[0][0])
            self.sessions.pop(victim.token, None)
            self.by_client.pop(victim.client_id, None)
            self._restored = {d: r for d, r in self._restored.items() if r is not victim}
            return victim.shard_index, [victim]
        if idle:
            raise ServiceError(
                "UNAVAILABLE",
                f"all {len(self.shards)} client slots are taken; slots of clients that "
                f"do not train are freed after {limit:g} s: retry later",
            )
        raise ServiceError("RESOURCE_EXHAUSTED", f"all {len(self.shards)} client slots are taken")

    def session(self, token: str, run_id: str, identity: str | tuple[str, ...] = "") -> Session:
        """The session of `token`; checks the run id and, under mTLS, that the same certificate presents it
        (`identity`: the certificate's name, or all of its names)."""
        names = (identity,) if isinstance(identity, str) else tuple(identity)
        s = self.sessions.get(token) if token else None
        if s is None and token and self._restored:  # first call of a client after a server restart
            with self._lock:
                s = self._restored.pop(token_digest(token), None)
                if s is not None:
                    s.token = token
                    self.sessions[token] = s
                s = self.sessions.get(token)
        if s is None:
            raise ServiceError("UNAUTHENTICATED", "unknown or expired session token")
        if s.identity not in names and not (not s.identity and names in ((), ("",))):
            raise ServiceError(
                "PERMISSION_DENIED", f"session of client {s.client_id!r} used with another client certificate"
            )
        if run_id != self.run_id:
            raise ServiceError("FAILED_PRECONDITION", f"run id {run_id!r} is not this run ({self.run_id})")
        return s

    def leave(self, s: Session) -> None:
        with self._lock:
            self.sessions.pop(s.token, None)
            current = self.by_client.get(s.client_id) is s
            if current:
                self.by_client.pop(s.client_id, None)
                if self.checkpointer:
                    self._save_registry()
        if current:  # a stale session (its client rejoined since) must not take the new one out of the run
            self.rounds.unregister(s.client_id)

    @property
    def closing(self) -> bool:
        """The server is shutting down: new calls are answered UNAVAILABLE."""
        return self.rounds.shutting_down

    @property
    def has_clients(self) -> bool:
        """Clients still in the run (joined, or expected back after a server restart)."""
        return bool(self.by_client)

    def shard_indices(self, s: Session) -> np.ndarray:
        return self.shards[s.shard_index]

    # -- steps ---------------------------------------------------------------------------------------------
    def _check_step(self, s: Session, round_idx: int, step: int) -> None:
        self.rounds.check_training(s.client_id, round_idx)
        last = s.last_step.get(round_idx, -1)
        if s.resumed and last < 0 and step != 0:
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"round {round_idx} was restarted (server resumed from a "
                f"checkpoint): redo it from step 0 after AwaitRound",
            )
        if step <= last:
            raise ServiceError(
                "ALREADY_EXISTS" if step == last else "FAILED_PRECONDITION",
                f"step {step} of round {round_idx} is {'a duplicate' if step == last else 'out of order'}"
                f" (last step done: {last})",
            )

    def _check_batch(self, tensors: dict, want_grad_shape: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = {"h", "attention_mask", "labels"} - set(tensors)
        if missing:
            raise ServiceError("INVALID_ARGUMENT", f"step lacks tensors {sorted(missing)}")
        unknown = set(tensors) - {"h", "attention_mask", "labels"}
        if unknown:
            raise ServiceError("INVALID_ARGUMENT", f"unexpected tensors {sorted(unknown)}")
        h, mask, labels = tensors["h"], tensors["attention_mask"], tensors["labels"]
        hidden = int(self.manifest.get("hidden_size") or self.split.peft_model.config.hidden_size)
        if h.ndim != 3 or h.shape[-1] != hidden or not np.issubdtype(h.dtype, np.floating):
            raise ServiceError(
                "INVALID_ARGUMENT", f"h must be float [batch, seq, {hidden}], got {h.dtype} {list(h.shape)}"
            )
        b, sq = h.shape[:2]
        if b == 0 or sq == 0:
            raise ServiceError("INVALID_ARGUMENT", "empty batch")
        if sq > self.cfg.data.max_seq_len:
            raise ServiceError("INVALID_ARGUMENT", f"sequence length {sq} > max_seq_len {self.cfg.data.max_seq_len}")
        if mask.shape != (b, sq) or not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"attention_mask must be 0/1 integers of shape [{b}, {sq}], got {mask.dtype} {list(mask.shape)}",
            )
        if not (mask.sum(axis=1) > 0).all():
            raise ServiceError("INVALID_ARGUMENT", "attention_mask has a row with no tokens")
        if self.cfg.model.task == "seq-cls":
            if labels.shape != (b,) or not np.issubdtype(labels.dtype, np.integer):
                raise ServiceError(
                    "INVALID_ARGUMENT",
                    f"labels must be integers of shape [{b}], got {labels.dtype} {list(labels.shape)}",
                )
            if labels.min() < 0 or labels.max() >= self.cfg.model.num_labels:
                raise ServiceError("INVALID_ARGUMENT", f"labels must be in [0, {self.cfg.model.num_labels})")
        else:
            if labels.shape != (b, sq) or not np.issubdtype(labels.dtype, np.integer):
                raise ServiceError(
                    "INVALID_ARGUMENT",
                    f"labels must be integers of shape [{b}, {sq}], got {labels.dtype} {list(labels.shape)}",
                )
            vocab = int(self.split.peft_model.config.vocab_size)
            if not ((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab))).all():
                raise ServiceError("INVALID_ARGUMENT", f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX}")
        h = checked_float32("h", h, self.cfg.server.security.max_abs_value)
        return h, mask.astype(np.int64, copy=False), labels.astype(np.int64, copy=False)

    def _live(self, s: Session) -> None:
        """A stream opened before its client left or rejoined must not act for it any more."""
        if self.sessions.get(s.token) is not s:
            raise ServiceError("UNAUTHENTICATED", f"session of client {s.client_id!r} has ended (left or rejoined)")

    def train_step(self, s: Session, round_idx: int, step: int, tensors: dict):
        """One split step. A retry of the last step with identical inputs (a link that dropped the reply) gets
        the same reply again without training twice; any other repeat is refused. The step is checked here,
        before the trainer may fuse it with other clients' steps (`training.server_batch`), so a bad step
        never joins a fused one."""
        self._live(s)
        with s.lock:
            self._live(s)  # again under the lock: a rejoin that rolled this session back holds it while it does
            last = s.last_reply
            if last is not None and last[:2] == (round_idx, step) and _same_tensors(last[2], tensors):
                return last[3]  # compared only when the step repeats: nothing is added to the normal path
            self._check_step(s, round_idx, step)
            h, mask, labels = self._check_batch(tensors)
            if round_idx not in s.round_mark:  # what an abandoned round of this session is rolled back to
                s.round_mark = {round_idx: self.trainer.slot_state(self._slot_of(s))}
            result = self.trainer.train_step(s.client_id, h, mask, labels)
            s.last_step[round_idx] = step
            s.round_steps[round_idx] = s.round_steps.get(round_idx, 0) + 1
            s.last_reply = (round_idx, step, tensors, result)
            if not s.trained:
                s.trained = True
                if self.checkpointer:
                    with self._lock:
                        self._save_registry()
            return result

    def _slot_of(self, s: Session) -> str | None:
        """Whose top adapter a session trains: its own in sfl-v1, the shared one otherwise."""
        return s.client_id if self.trainer.personal else None

    def _rollback_abandoned(self, old: Session) -> None:
        """A client rejoined while the round it was training is still open: it redoes the round from step 0, so
        the server steps its abandoned session took in that round are undone first (see
        TopTrainer.restore_slot for what that means with a shared top adapter)."""
        with old.lock:  # waits for a step of the old session that is still being computed
            r = self.rounds.round_idx
            n = old.round_steps.get(r, 0)
            if not n or r not in old.round_mark or self.rounds.selected_since(old.client_id) is None:
                return
            exact = self.trainer.restore_slot(self._slot_of(old), old.round_mark[r], n)
            old.round_steps.pop(r, None)
            log.warning(
                "client %s rejoined during round %d: its %d server steps of that round rolled back (%s)",
                old.client_id,
                r,
                n,
                "exactly" if exact else "step count; the shared adapter keeps them",
            )

    def eval_step(self, s: Session, tensors: dict):
        h, mask, labels = self._check_batch(tensors)
        return self.trainer.eval_step(s.client_id, h, mask, labels)

    # -- rounds --------------------------------------------------------------------------------------------
    def _check_factors(self, s: Session, factors: dict) -> None:
        """Shapes of uploaded factors, checked before they reach (and could break) a round's aggregation."""
        d = self.rounds.directive(s.client_id)
        rank = max(d.rank if d is not None else 0, self.cfg.lora.r)
        shapes = {f["name"]: tuple(f["shape"]) for f in self.manifest["factors"]}
        for k, v in factors.items():
            want = shapes.get(k)
            if want is None:
                raise ServiceError("INVALID_ARGUMENT", f"unknown factor {k!r}")
            if k.endswith(".lora_A.weight"):
                ok = v.ndim == 2 and v.shape[1] == want[1] and 1 <= v.shape[0] <= rank
            elif k.endswith(".lora_B.weight"):
                ok = v.ndim == 2 and v.shape[0] == want[0] and 1 <= v.shape[1] <= rank
            else:
                ok = v.shape == want
            if not ok:
                raise ServiceError(
                    "INVALID_ARGUMENT",
                    f"factor {k!r} has shape {list(v.shape)}, expected {list(want)} (rank <= {rank})",
                )
            factors[k] = checked_float32(f"factor {k!r}", v, self.cfg.server.security.max_abs_value)

    def push_adapter(self, s: Session, round_idx: int, factors: dict, num_samples: float, metrics: dict):
        """Take a client's adapter for the round it trained. The aggregation weight is the size of the shard the
        server assigned, never the client's `num_samples` (a claim of 2^64-1 would take all the weight)."""
        self._live(s)
        if round_idx not in s.last_step:
            why = (
                "was restarted (server resumed from a checkpoint): train it again"
                if s.resumed
                else "has no training step of this client yet: train"
            )
            raise ServiceError("FAILED_PRECONDITION", f"round {round_idx} {why} before pushing")
        self._check_factors(s, factors)
        if num_samples != s.num_samples:
            log.debug(
                "client %s claims %s samples; weighting by its shard's %d", s.client_id, num_samples, s.num_samples
            )
        weight = float(s.num_samples)
        if self.checkpointer is None:
            return self.rounds.submit(s.client_id, round_idx, factors, weight, metrics)
        with s.lock:  # one push of a client at a time: a refused repeat must not touch the accepted one's file
            self.rounds.check_training(s.client_id, round_idx)
            # on disk before it counts: a server that dies before the round closes still has it after a restart
            top = self.trainer.slot_state(s.client_id) if self.trainer.personal else None
            try:
                self.checkpointer.save_pending(round_idx, s.client_id, factors, weight, metrics, top)
            except OSError:
                log.exception("client %s: could not checkpoint its adapter of round %d", s.client_id, round_idx)
            try:
                return self.rounds.submit(s.client_id, round_idx, factors, weight, metrics)
            except ServiceError:
                self.checkpointer.drop_pending(round_idx, s.client_id)
                raise

    def await_round(self, s: Session, min_round: int, timeout: float | None, alive=None) -> Assignment | None:
        return self.rounds.wait_assignment(s.client_id, min_round, timeout, alive)

    def _on_close(self, rec: RoundRecord) -> dict[str, float]:
        """After aggregation: update top adapters (sfl-v1), evaluate the global model, log the round."""
        t0 = time.perf_counter()
        if self.top_strategy is not None and rec.reported:
            from splitwave.server.aggregation.base import ClientUpdate

            ups = [
                ClientUpdate(
                    c, self.trainer.factors(c), self.shard_indices(self.by_client[c]).size if c in self.by_client else 1
                )
                for c in rec.reported
            ]
            try:
                res = self.top_strategy.aggregate(rec.round_idx, ups)
            except ValueError as err:  # e.g. a non-finite aggregate: every client keeps its top adapter
                res = None
                rec.refused = "; ".join(x for x in (rec.refused, f"top: {err}") if x)
                log.error("round %d: top aggregate refused, top adapters unchanged: %s", rec.round_idx, err)
            for c in self.trainer.client_ids() if res is not None else ():
                view = (res.client_factors or {}).get(c) or res.global_factors
                if view:
                    self.trainer.set_factors(view, c)
        out = {"aggregate_s": time.perf_counter() - t0}
        if (rec.round_idx + 1) % self.cfg.rounds.eval_every == 0 or rec.round_idx + 1 == self.cfg.rounds.num_rounds:
            out.update(self._timed_eval())
        if rec.result is not None and rec.result.base_deltas:
            self._fold_base_deltas(rec.result.base_deltas)
        if rec.round_idx + 1 >= self.cfg.rounds.num_rounds:
            self.write_final()
        line = {
            "round": rec.round_idx,
            "time": time.time(),
            "selected": rec.selected,
            "reported": rec.reported,
            "late": rec.late,
            "round_wall_s": rec.closed_at - rec.opened_at,
            **out,
            "aggregation": rec.result.metrics if rec.result is not None else {},
            "clients": rec.client_metrics,
        }
        if rec.round_idx == 0 and self.pre_eval is not None:
            line["pre_eval"] = self.pre_eval  # in the line only: `out` goes to the clients as numbers
        if rec.refused:
            line["aggregate_refused"] = rec.refused
            out["aggregate_refused"] = 1.0
        if self.meter is not None:
            line["bytes"] = {f"{c}|{d}|{m}": n for (c, d, m), n in self.meter.snapshot().items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        log.info(
            "round %d closed: %s",
            rec.round_idx,
            ", ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float)),
        )
        return out

    def _fold_base_deltas(self, deltas: dict[str, np.ndarray]) -> None:
        """FedEx-LoRA / FLoRA residuals: keep the running sum and fold it into the server's copy of the edge."""
        from splitwave.server.adapter_export import apply_to_split

        for m, d in deltas.items():
            self.base_deltas_total[m] = self.base_deltas_total.get(m, 0) + np.asarray(d, np.float32)
        self.base_version += 1
        compute.run(apply_to_split, self.split, self.global_edge_factors(), {}, deltas)

    def final_top_factors(self) -> dict[str, np.ndarray]:
        if self.top_strategy is not None:
            return self.top_strategy.global_output() or self.trainer.factors()
        return self.trainer.factors()

    def write_final(self) -> Path:
        """Final global adapters of the run (edge + top), readable by `splitwave export-adapter`."""
        from splitwave.server.adapter_export import write_final

        return write_final(
            self.run_dir, self.cfg, self.global_edge_factors(), self.final_top_factors(), self.base_deltas_total
        )

    def global_edge_factors(self) -> dict[str, np.ndarray]:
        g = self.strategy.global_output()
        if g is None:  # per-client views (FlexLoRA, HetLoRA, ...): evaluate the view at the model's own rank
            g = self.strategy.client_view("__eval__", self.cfg.lora.r)
        if not g:  # FLoRA: everything was merged into the base weights; the fresh adapters add nothing (B = 0)
            g = {
                k: (np.zeros_like(v) if k.endswith(".lora_B.weight") else v)
                for k, v in self.split.edge_factors().items()
            }
        return g

    def _timed_eval(self) -> dict[str, float]:
        """evaluate_global plus `eval_s`, its wall time (the report shows evaluation apart from aggregation)."""
        t0 = time.perf_counter()
        out = self.evaluate_global()
        return {**out, "eval_s": time.perf_counter() - t0}

    def evaluate_global(self, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and loss (causal LM: next-token accuracy, loss per labelled token, perplexity) of the global
        model (edge adapter after aggregation + top) on the eval set; see server/evaluation.py."""
        return compute.run(self._evaluate_global, batch_size)

    def _evaluate_global(self, batch_size: int) -> dict[str, float]:
        edge_now = self.split.edge_factors()
        try:
            self.split.set_edge_factors(self.global_edge_factors())
            top = self.top_strategy.global_output() if self.top_strategy is not None else None
            with self.trainer.lock:
                saved_top = {k: p.detach().clone() for k, p in self.trainer.params.items()}
                if top:
                    self.trainer._load({k: torch.from_numpy(np.asarray(v)) for k, v in top.items()})
                self.split.peft_model.eval()
                try:
                    return evaluate(self.split, self.eval_data, batch_size)
                finally:
                    self.trainer._load(saved_top)
        finally:
            self.split.set_edge_factors(edge_now)

    def shutdown(self) -> None:
        """The server is going away (SIGTERM, stop()): the run is not over, so waiting and training clients are
        told UNAVAILABLE (they retry against the restarted server) rather than to stop."""
        self.rounds.shutdown()
