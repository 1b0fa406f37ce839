"""The server's plain logic, wired together: split steps, rounds (aggregation, evaluation, the metrics line),
checkpoints and resume, on top of the split model and bundle (setup.py), the client data (datasets.py), the
session table (sessions.py) and the input checks (validation.py).

The gRPC servicer (`server/service.py`) only decodes messages and calls this object, so everything here is
testable without a network. Errors are raised as `ServiceError(code, message)` with a gRPC status name.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from splitwave.common.config import ExperimentConfig
from splitwave.common.lora import is_b_key
from splitwave.common.manifest import BundleManifest
from splitwave.common.shard import build_token_dataset
from splitwave.server import compute
from splitwave.server.adapter_export import apply_to_split, write_final
from splitwave.server.aggregation.base import ClientUpdate
from splitwave.server.aggregation.registry import make_strategy
from splitwave.server.checkpoint import Checkpointer, config_digest
from splitwave.server.datasets import client_shards, data_spec
from splitwave.server.errors import ServiceError
from splitwave.server.evaluation import evaluate
from splitwave.server.generation import Generator
from splitwave.server.rounds import Assignment, RoundManager, RoundRecord
from splitwave.server.sessions import Session, SessionTable, check_join
from splitwave.server.setup import build_split, ensure_bundle, index_bundle
from splitwave.server.trainer import TopTrainer
from splitwave.server.validation import check_batch, check_factors, same_tensors, step_byte_limit

log = logging.getLogger(__name__)


class SplitServer:
    """One run's server: builds the split model, bundle and client shards from the config, then serves joins,
    split steps and adapter pushes, and closes rounds (aggregation, evaluation, metrics, checkpoints)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, cache_dir: Path = Path(".cache/bundles")):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:12]
        if cfg.server.checkpoint_dir:  # fail fast on a checkpoint of another config, before building anything
            Checkpointer(cfg.server.checkpoint_dir).load(config_digest(cfg))
        t0 = time.perf_counter()
        self.split = compute.run(build_split, cfg)
        self.bundle_dir = compute.run(ensure_bundle, cfg, Path(cache_dir), self.split)
        self.manifest = BundleManifest.from_file(self.bundle_dir)
        self.bundle_files, self.bundle_hash = index_bundle(self.bundle_dir)
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
        if cfg.edge.quantize != "none" and self.strategy.MERGES_INTO_BASE:
            raise ValueError(
                f"aggregation.strategy {cfg.aggregation.strategy!r} folds updates into the frozen base weights, "
                f"which an edge.quantize {cfg.edge.quantize!r} bundle cannot take; use edge.quantize: none"
            )
        self.strategy.initialize(self.split.edge_factors())
        self.top_strategy = None
        if tr.mode == "sfl-v1":
            self.top_strategy = self._make_strategy("top")
            self.top_strategy.initialize(self.trainer.factors())

        vocab = int(self.split.peft_model.config.vocab_size)
        tok_dir = self.bundle_dir if self.manifest.tokenizer_files else None
        self.train_spec = data_spec(cfg, "train", vocab)
        self.eval_spec = data_spec(cfg, "eval", vocab)
        # the arrays every edge rebuilds from train_spec (kept: the simulation engine's clients read theirs here)
        self.train_data = build_token_dataset(self.train_spec, tok_dir)
        self.shards = client_shards(cfg, self.train_data)
        self.eval_data = build_token_dataset(self.eval_spec, tok_dir)
        # text generation scored at each evaluation (generation.num_prompts > 0; E2E only)
        self.generator = Generator.from_config(cfg, tok_dir, self.run_dir) if cfg.generation.num_prompts else None

        self.base_deltas_total: dict[str, np.ndarray] = {}  # module -> running sum, torch weight layout
        self.base_version = 0
        self.checkpointer = Checkpointer(cfg.server.checkpoint_dir) if cfg.server.checkpoint_dir else None
        self.session_table = SessionTable(
            [len(s) for s in self.shards],
            cfg.server.limits.unused_slot_s,
            persist=self._save_registry if self.checkpointer else None,
        )
        self.metrics_path = self.run_dir / "server_metrics.jsonl"
        self.metrics_path.write_text("")  # a run's own rounds only (a resumed run copies the checkpoint's lines)
        self.meter = None  # set by the transport (protos.metering.ByteMeter)
        self._pending_reports: dict = {}  # adapters pushed to the open round before a restart (see _resume)
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
            self.session_table.save()

    @property
    def sessions(self) -> dict[str, Session]:
        """Live sessions by token."""
        return self.session_table.sessions

    @property
    def by_client(self) -> dict[str, Session]:
        """The current session of every client in the run, by client id."""
        return self.session_table.by_client

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _resume(self) -> tuple[int, dict]:
        """Take over run id, clients and the state after the last completed round from the checkpoint."""
        got = self.checkpointer.load(config_digest(self.cfg))
        if got is None:
            return 0, {}
        self.run_id = got.run_id
        self.session_table.restore(got.clients)
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

    def _save_registry(self, clients: dict[str, dict]) -> None:
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
        """Returns (session, open round, resume secret); see sessions.check_join and SessionTable.admit for who
        may join under which name."""
        client_name = check_join(
            self.cfg, client_name, enrollment_secret, codecs, training_modes, protocol_version, identity, identity_names
        )
        s, old, evicted, secret = self.session_table.admit(
            client_name, identity, resume_secret, self.rounds.selected_since
        )
        for e in evicted:
            self.rounds.unregister(e.client_id)
        if old is not None:
            self._rollback_abandoned(old)
        self.rounds.register(s.client_id)
        log.info(
            "client %s %s (shard %d, %d samples)",
            s.client_id,
            "rejoined" if old is not None else "joined",
            s.shard_index,
            s.num_samples,
        )
        return s, self.rounds.round_idx, secret

    def session(self, token: str, run_id: str, identity: str | tuple[str, ...] = "") -> Session:
        """The session of `token`; checks the run id and, under mTLS, that the same certificate presents it
        (`identity`: the certificate's name, or all of its names)."""
        return self.session_table.lookup(token, run_id, self.run_id, identity)

    def leave(self, s: Session) -> None:
        if self.session_table.remove(s):  # a stale session (its client rejoined since) must not take the new one out
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

    def check_batch(self, tensors: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A step's tensors (padded or packed) checked against this run's model and limits, in the padded
        layout (validation.check_batch)."""
        hidden, max_seq_len = self.manifest.hidden_size, self.cfg.data.max_seq_len
        return check_batch(
            tensors,
            hidden=hidden,
            max_seq_len=max_seq_len,
            task=self.cfg.model.task,
            num_labels=self.cfg.model.num_labels,
            vocab=int(self.split.peft_model.config.vocab_size),
            max_abs=self.cfg.server.security.max_abs_value,
            max_bytes=step_byte_limit(
                self.cfg.training.batch_size, max_seq_len, hidden, self.cfg.server.max_tensor_bytes
            ),
        )

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
            if last is not None and last[:2] == (round_idx, step) and same_tensors(last[2], tensors):
                return last[3]  # compared only when the step repeats: nothing is added to the normal path
            self._check_step(s, round_idx, step)
            h, mask, labels = self.check_batch(tensors)
            if round_idx not in s.round_mark:  # what an abandoned round of this session is rolled back to
                s.round_mark = {round_idx: self.trainer.slot_state(self._slot_of(s))}
            result = self.trainer.train_step(s.client_id, h, mask, labels)
            s.last_step[round_idx] = step
            s.round_steps[round_idx] = s.round_steps.get(round_idx, 0) + 1
            s.last_reply = (round_idx, step, tensors, result)
            if not s.trained:
                self.session_table.mark_trained(s)
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
        h, mask, labels = self.check_batch(tensors)
        return self.trainer.eval_step(s.client_id, h, mask, labels)

    # -- rounds --------------------------------------------------------------------------------------------
    def _check_factors(self, s: Session, factors: dict) -> None:
        """Shapes of uploaded factors (validation.check_factors), up to the rank this client was given."""
        d = self.rounds.directive(s.client_id)
        rank = max(d.rank if d is not None else 0, self.cfg.lora.r)
        shapes = self.manifest.factor_shapes()
        check_factors(factors, shapes, rank, self.cfg.server.security.max_abs_value)

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
        return write_final(
            self.run_dir, self.cfg, self.global_edge_factors(), self.final_top_factors(), self.base_deltas_total
        )

    def global_edge_factors(self) -> dict[str, np.ndarray]:
        g = self.strategy.global_output()
        if g is None:  # per-client views (FlexLoRA, HetLoRA, ...): evaluate the view at the model's own rank
            g = self.strategy.client_view("__eval__", self.cfg.lora.r)
        if not g:  # FLoRA: everything was merged into the base weights; the fresh adapters add nothing (B = 0)
            g = {k: (np.zeros_like(v) if is_b_key(k) else v) for k, v in self.split.edge_factors().items()}
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
            with self.trainer.using_factors(top):
                self.split.peft_model.eval()
                out = evaluate(self.split, self.eval_data, batch_size)
                if self.generator is not None:
                    out.update(self.generator.score(self.split))
                return out
        finally:
            self.split.set_edge_factors(edge_now)

    def shutdown(self) -> None:
        """The server is going away (SIGTERM, stop()): the run is not over, so waiting and training clients are
        told UNAVAILABLE (they retry against the restarted server) rather than to stop."""
        self.rounds.shutdown()
