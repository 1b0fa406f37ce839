"""The edge client: join, fetch the bundle, and per round train local steps over the Train stream.

Torch-free: onnxruntime + numpy + grpcio. Every step is lock-step over one bidirectional stream (send h,
wait for dL/dh) because the backward needs the gradient of *this* step. A broken stream is reopened and the
step resent with identical bytes (the server replays its reply rather than training twice); a server that is
unreachable is retried with exponential backoff.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from edge.data import Batcher
from edge.ranks import RankAdapter
from edge.shard import build_token_dataset, round_batch
from protos import splitwave_pb2 as pb
from protos.codec import CODECS, Assembler, encode, factor_codec
from protos.metering import ByteMeter, MeteredStub

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED}
MAX_BACKOFF_S = 10.0


def _retryable(e: grpc.RpcError) -> bool:
    """Transport trouble, or a server whose call slots are full (not: a tensor over its size limit)."""
    if e.code() in RETRYABLE:
        return True
    return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent rpc limit" in (e.details() or "").lower()


class EdgeError(RuntimeError):
    pass


@dataclass
class ClientOptions:
    name: str = ""
    cache_dir: Path = Path(".cache/edge")
    backend: str = "onnxruntime"
    threads: int | None = None
    enrollment_secret: str = ""
    metrics_path: Path | None = None
    max_retries: int = 10  # with backoff doubling up to MAX_BACKOFF_S: rides out a server restart of ~1 min
    backoff_s: float = 0.2
    credentials: grpc.ChannelCredentials | None = None
    channel_options: list = field(default_factory=list)


def _retry(fn, opts: ClientOptions, what: str):
    delay = opts.backoff_s
    for attempt in range(opts.max_retries + 1):
        try:
            return fn()
        except grpc.RpcError as e:
            if not _retryable(e) or attempt == opts.max_retries:
                raise
            log.warning("%s failed (%s: %s); retry %d in %.2f s", what, e.code().name, e.details(), attempt + 1, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, MAX_BACKOFF_S)


def fresh_lora(factors: dict[str, np.ndarray], seed) -> dict[str, np.ndarray]:
    """peft's LoRA init in numpy: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in factors.items():
        if k.endswith(".lora_A.weight"):
            bound = 1.0 / np.sqrt(v.shape[1])
            out[k] = rng.uniform(-bound, bound, size=v.shape).astype(np.float32)
        else:
            out[k] = np.zeros_like(v)
    return out


class _StepStream:
    """One Train (or Evaluate) call driven in lock-step: put a step's messages, read until its end_step."""

    def __init__(self, rpc, metadata=None):
        self._q: queue.Queue = queue.Queue()
        self._replies = rpc(iter(self._q.get, None), metadata=metadata)

    def step(self, messages: list) -> tuple[dict, pb.StepResult]:
        for m in messages:
            self._q.put(m)
        asm = Assembler()
        for reply in self._replies:
            if reply.WhichOneof("body") == "frame":
                asm.add(reply.frame)
            else:
                return asm.finish(), reply.end_step
        raise EdgeError("server closed the stream before answering the step")

    def close(self) -> None:
        self._q.put(None)
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass


class EdgeClient:
    def __init__(self, target: str, opts: ClientOptions | None = None):
        self.target = target
        self.opts = opts or ClientOptions()
        self.meter = ByteMeter()
        self.opts.cache_dir = Path(self.opts.cache_dir)
        self._channel = (grpc.secure_channel(target, self.opts.credentials, options=self.opts.channel_options)
                         if self.opts.credentials else grpc.insecure_channel(target, options=self.opts.channel_options))
        self.stub = MeteredStub(self._channel, self.meter, self.opts.name or "edge")
        self.runtime = None
        self.history: list[dict] = []
        self._round_start: tuple | None = None  # (round, factors, optimizer state, trainable) at the round's start

    # -- setup ---------------------------------------------------------------------------------------------
    def join(self) -> pb.JoinReply:
        caps = pb.Capabilities(protocol_version=1, backend=self.opts.backend, codecs=list(CODECS),
                               training_modes=["recompute", "saved"],
                               cached_bundle_hashes=[p.name for p in self.opts.cache_dir.glob("*") if p.is_dir()])
        # a named edge that restarts presents the resume secret of its earlier Join: the server gives a name
        # that has a session back only to it
        key = hashlib.sha256(f"{self.target}|{self.opts.name}".encode()).hexdigest()[:16]
        secret_file = self.opts.cache_dir / f".resume-{key}"
        resume = secret_file.read_text().strip() if self.opts.name and secret_file.exists() else ""
        req = pb.JoinRequest(client_name=self.opts.name, enrollment_secret=self.opts.enrollment_secret,
                             capabilities=caps, resume_secret=resume)
        self.joined = _retry(lambda: self.stub.Join(req, wait_for_ready=True, timeout=60), self.opts, "Join")
        if self.opts.name and self.joined.resume_secret:
            self.opts.cache_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.joined.resume_secret)
        self.stub.client_key = self.joined.client_id
        log.info("joined as %s (run %s, round %d)", self.joined.client_id, self.joined.run_id,
                 self.joined.current_round)
        return self.joined

    def _header(self, round_idx: int = 0, step: int = 0) -> pb.Header:
        return pb.Header(session_token=self.joined.session_token, run_id=self.joined.run_id, round=round_idx,
                         step=step)

    def fetch_bundle(self) -> Path:
        """The bundle folder, downloaded once per bundle hash and verified file by file."""
        target = self.opts.cache_dir / self.joined.bundle_hash
        if (target / "manifest.json").exists():
            return target
        tmp = self.opts.cache_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            handles, hashes, expect = {}, {}, {}
            for chunk in self.stub.GetBundle(pb.BundleRequest(header=self._header(),
                                                              bundle_hash=self.joined.bundle_hash)):
                name = chunk.file_name
                path = (tmp / name).resolve()
                if tmp.resolve() not in path.parents:
                    raise EdgeError(f"bundle file name escapes the bundle folder: {name!r}")
                if name not in handles:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handles[name] = open(path, "wb")
                    hashes[name] = hashlib.sha256()
                    expect[name] = (chunk.sha256, chunk.total_size)
                if handles[name].tell() != chunk.offset:
                    raise EdgeError(f"bundle chunk of {name} at offset {chunk.offset} out of order")
                handles[name].write(chunk.data)
                hashes[name].update(chunk.data)
            for name, fh in handles.items():
                fh.close()
                sha, size = expect[name]
                if hashes[name].hexdigest() != sha or (tmp / name).stat().st_size != size:
                    raise EdgeError(f"bundle file {name} failed its sha256/size check")
            try:
                tmp.rename(target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _make_runtime(self, bundle: Path):
        cfg = self.joined.config
        opt = cfg.optimizer
        kw = dict(lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, opt.beta2), eps=opt.eps)
        if self.opts.backend == "torch":  # the reference backend, for comparisons only
            from edge.torch_backend import TorchEdge

            return TorchEdge.from_bundle(bundle, **kw)
        from edge.runtime import EdgeRuntime

        return EdgeRuntime(bundle, mode=cfg.training_mode or "recompute", threads=self.opts.threads, **kw)

    def setup(self) -> None:
        self.join()
        bundle = self.fetch_bundle()
        self.runtime = self._make_runtime(bundle)
        cfg = self.joined.config
        spec = json.loads(cfg.shard.spec_json)
        tok = bundle if self.runtime.manifest.get("tokenizer_files") else None
        self.data = build_token_dataset(spec, tok)
        indices = np.asarray(cfg.shard.indices, dtype=np.int64)
        if len(indices) and (indices.max() >= len(self.data) or indices.min() < 0):
            raise EdgeError(f"shard indices out of range for a dataset of {len(self.data)} rows")
        self.batcher = Batcher(indices, cfg.batch_size, cfg.seed, client_id=cfg.shard.shard_index)
        self.num_samples = len(indices)
        manifest = json.loads(self.joined.manifest_json)
        self.shapes = {f["name"]: tuple(f["shape"]) for f in manifest["factors"]}
        lora = manifest["lora"]
        self.ranks = RankAdapter(lora["r"], lora["alpha"], lora.get("rslora", False))

    # -- rounds --------------------------------------------------------------------------------------------
    def await_round(self, round_idx: int, no_wait: bool) -> pb.RoundDirectives:
        def call():
            asm, deltas = Assembler(), Assembler()
            directives = None
            for reply in self.stub.AwaitRound(pb.RoundRequest(header=self._header(round_idx), no_wait=no_wait)):
                which = reply.WhichOneof("body")
                if which == "factor":
                    asm.add(reply.factor)
                elif which == "base_delta":
                    deltas.add(reply.base_delta)
                else:
                    directives = reply.directives
            return asm.finish(), deltas.finish(), directives

        factors, deltas, d = _retry(call, self.opts, "AwaitRound")
        if d is None:
            raise EdgeError("AwaitRound ended without directives")
        if deltas:  # FedEx-LoRA / FLoRA: the running sum of residuals folded into the frozen weights
            self.runtime.set_base_deltas(deltas)
        factors = self.ranks.to_graph(factors, self.shapes)  # a smaller rank than the bundle's: zero-padded
        if d.reinit:  # FLoRA: a fresh adapter (at this client's rank) after the merge
            fresh = fresh_lora(self.runtime.factors, seed=[self.joined.config.seed, self.batcher.client_id,
                                                           d.next_round])
            self.ranks.set_rank([k for k in fresh if k not in factors], d.rank)
            self.runtime.set_factors(self.ranks.mask({k: v for k, v in fresh.items() if k not in factors}))
            self.runtime.reset_optimizer()
        if factors:
            self.runtime.set_factors(factors)
        if hasattr(self.runtime, "trainable"):
            self.runtime.trainable = set(d.trainable_factors) or set(self.runtime.factor_names)
        return d

    def _batch(self, round_idx: int, step: int):
        return round_batch(self.data, self.batcher, self.joined.config.local_steps, round_idx, step)

    def _step_messages(self, cls, round_idx: int, step: int, ids, mask, labels, h, metrics) -> list:
        codec = self.joined.config.codec_up
        header = self._header(round_idx, step)
        msgs = [cls(header=header, frame=f) for f in encode("h", h, codec)]
        msgs += [cls(header=header, frame=f) for f in encode("attention_mask", mask, "raw")]
        msgs += [cls(header=header, frame=f) for f in encode("labels", labels, "raw")]
        msgs.append(cls(header=header, end_step=pb.StepEnd(batch_size=len(labels), metrics=metrics)))
        return msgs

    def train_round(self, round_idx: int) -> dict:
        cfg = self.joined.config
        stream = _StepStream(self.stub.Train)
        losses, correct, count = [], 0, 0
        steps_done = 0
        try:
            for step in range(cfg.local_steps):
                ids, mask, labels = self._batch(round_idx, step)
                t0 = time.perf_counter()
                h = self.runtime.forward(ids, mask)
                t_fwd = time.perf_counter() - t0
                msgs = self._step_messages(pb.TrainRequest, round_idx, step, ids, mask, labels, h,
                                           {"edge_fwd_s": t_fwd})
                up0, down0 = self.meter.total(direction="up"), self.meter.total(direction="down")
                t1 = time.perf_counter()
                for attempt in range(self.opts.max_retries + 1):
                    try:
                        tensors, res = stream.step(msgs)
                        break
                    except grpc.RpcError as e:
                        if not _retryable(e) or attempt == self.opts.max_retries:
                            raise
                        log.warning("Train stream broke at step %d (%s); reopening", step, e.code().name)
                        stream.close()
                        time.sleep(min(self.opts.backoff_s * (2 ** attempt), MAX_BACKOFF_S) * (0.5 + random.random()))
                        stream = _StepStream(self.stub.Train)
                t_net = time.perf_counter() - t1
                if res.stop_local_work:
                    break
                t2 = time.perf_counter()
                grads = self.runtime.backward(tensors["grad_h"])
                self.runtime.step(self.ranks.mask(grads) if self.ranks.ranks else grads)
                t_end = time.perf_counter()
                t_bwd = t_end - t2
                steps_done += 1
                losses.append(res.loss)
                correct += res.correct
                count += res.count
                rec = {"kind": "step", "client": self.joined.client_id, "round": round_idx, "step": step,
                       "loss": res.loss, "batch": int(len(labels)), "seq": int(ids.shape[1]),
                       "edge_fwd_s": t_fwd, "edge_bwd_s": t_bwd, "server_s": res.metrics.get("server_s", 0.0),
                       "roundtrip_s": t_net, "step_s": t_end - t0, "bytes_up": self.meter.total(direction="up") - up0,
                       "bytes_down": self.meter.total(direction="down") - down0, "time": time.time()}
                self._record(rec)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("round %d ended for us early: %s", round_idx, e.details())
            return {"steps": steps_done, "closed": True}
        except EdgeError as e:  # the server ended the stream without answering (e.g. it is shutting down)
            log.warning("round %d: %s", round_idx, e)
            return {"steps": steps_done, "closed": True}
        finally:
            stream.close()
        return {"steps": steps_done, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "train_accuracy": correct / max(count, 1), "closed": False}

    def push_adapter(self, round_idx: int, upload: list[str], stats: dict) -> pb.AdapterReply | None:
        keys = upload or list(self.runtime.factors)
        header = self._header(round_idx, stats.get("steps", 0))

        codec = factor_codec(self.joined.config.codec_up.codec)  # int8/top-k are for activations, not adapters

        def messages():
            for k in keys:
                for f in encode(k, self.ranks.from_graph(k, self.runtime.factors[k]), codec):
                    yield pb.AdapterRequest(header=header, frame=f)
            yield pb.AdapterRequest(header=header, end=pb.AdapterEnd(
                num_samples=self.num_samples, local_steps=stats.get("steps", 0),
                metrics={k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}))

        t0 = time.perf_counter()
        up0 = self.meter.total(direction="up", method="PushAdapter")
        try:
            reply = _retry(lambda: self.stub.PushAdapter(messages()), self.opts, "PushAdapter")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("adapter of round %d refused: %s", round_idx, e.details())
            return None
        self._record({"kind": "push", "client": self.joined.client_id, "round": round_idx,
                      "bytes_up": self.meter.total(direction="up", method="PushAdapter") - up0,
                      "push_s": time.perf_counter() - t0, "time": time.time(), **stats})
        return reply

    def _record(self, rec: dict) -> None:
        self.history.append(rec)
        if self.opts.metrics_path is not None:
            with open(self.opts.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run(self) -> dict:
        """Take part in rounds until the server says stop; returns a summary."""
        if self.runtime is None:
            self.setup()
        d = self.await_round(self.joined.current_round, no_wait=True)
        rounds = 0
        while not d.stop:
            r = d.next_round
            self._begin_round(r)
            t0 = time.perf_counter()
            stats = self.train_round(r)
            if not stats.pop("closed"):
                self.push_adapter(r, list(d.upload_factors), stats)
            self._record({"kind": "round", "client": self.joined.client_id, "round": r,
                          "wall_s": time.perf_counter() - t0, "time": time.time(), **stats})
            rounds += 1
            d = self.await_round(r, no_wait=False)
        self.leave("done")
        return {"client": self.joined.client_id, "rounds": rounds, "stop_reason": d.stop_reason,
                "bytes_up": self.meter.total(direction="up"), "bytes_down": self.meter.total(direction="down"),
                "final_metrics": dict(d.metrics)}

    def _begin_round(self, round_idx: int) -> None:
        """Snapshot the state a round starts from; if the server hands out the same round again (it restarted
        from a checkpoint taken before that round ended), go back to that state so the redo is exact."""
        opt = getattr(self.runtime, "optimizer", None)
        if self._round_start is not None and self._round_start[0] == round_idx:
            _, factors, opt_state, trainable = self._round_start
            log.warning("round %d handed out again (server restarted): rolling back to its start", round_idx)
            self.runtime.set_factors(factors)
            if opt_state is not None:
                opt.load_state_dict(copy.deepcopy(opt_state))
            if trainable is not None:
                self.runtime.trainable = set(trainable)
            return
        opt_state = copy.deepcopy(opt.state_dict()) if hasattr(opt, "state_dict") else None
        self._round_start = (round_idx, {k: np.array(v, copy=True) for k, v in self.runtime.factors.items()},
                             opt_state, set(self.runtime.trainable) if hasattr(self.runtime, "trainable") else None)

    def leave(self, reason: str) -> None:
        try:
            self.stub.Leave(pb.LeaveRequest(header=self._header(), reason=reason), timeout=10)
        except grpc.RpcError as e:
            log.warning("Leave failed: %s", e.details())

    def close(self) -> None:
        self._channel.close()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPLITWAVE_EDGE_CACHE", ".cache/edge"))
