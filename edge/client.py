"""The edge client: join, fetch the bundle, and per round train local steps over the Train stream.

Torch-free: onnxruntime + numpy + grpcio. Every step is lock-step over one bidirectional stream (send h,
wait for dL/dh) because the backward needs the gradient of *this* step. A broken stream is reopened and the
step resent with identical bytes (the server replays its reply rather than training twice); every call goes
through one retry policy (edge/retry.py). A session the server no longer knows (UNAUTHENTICATED, e.g. after a
server restart) is resumed by a rejoin under the same name with the resume secret of the first Join, and the
round in progress is redone from its start.

The compute runs on an `EdgeBackend` made by the factory the caller passes (default: ONNX Runtime); the
experiment layer passes the torch reference for `--backend torch`, so this module never imports the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import grpc
import numpy as np

from splitwave.common.backend import BackendFactory, BackendSettings, EdgeBackend
from splitwave.common.batching import Batcher
from splitwave.common.codec_policy import CodecPolicy, RateEstimator, step_shapes
from splitwave.common.lora import is_a_key
from splitwave.common.manifest import MANIFEST_FILE, BundleManifest
from splitwave.common.paths import DataNotFound
from splitwave.common.shard import build_token_dataset, check_data, round_batch
from splitwave.common.tokens import TokenDataset
from splitwave.edge.ranks import RankAdapter
from splitwave.edge.retry import Retrier, RetryPolicy, recovering
from splitwave.edge.runtime import EdgeRuntime
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import CODECS, Assembler, adapter_codec_up, encode
from splitwave.protos.feedback import ErrorFeedback
from splitwave.protos.metering import ByteMeter, MeteredStub
from splitwave.protos.steps import build_step

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BACKEND = "onnxruntime"  # the one backend built in; others come as a factory (EdgeClient's make_backend)
JOIN_TIMEOUT_S = 60.0
MAX_REJOINS = 5  # in a row without a finished round: beyond that, someone else keeps taking the name
# reconnect quickly to a server that comes back (gRPC's default backoff grows to 120 s between attempts)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class EdgeError(RuntimeError):
    pass


class SessionLost(EdgeError):
    """The server no longer knows our session token (it restarted, or the session expired): rejoin."""


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, because ru_maxrss keeps the peak of the process that
    forked us (a 500 MB parent makes a 10 MB child report 511 MB, measured); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class ClientOptions:
    name: str = ""
    cache_dir: Path = Path(".cache/edge")
    backend: str = DEFAULT_BACKEND  # the name declared at Join; anything else needs its factory (make_backend)
    threads: int | None = None
    enrollment_secret: str = ""
    metrics_path: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    data_dir: Path | None = None  # where the dataset files are (None: splitwave.common.paths' search order)
    credentials: grpc.ChannelCredentials | None = None
    channel_options: list[tuple[str, Any]] = field(default_factory=list)


class _RoundStart(NamedTuple):
    """The state a round started from, to redo it exactly when the server hands it out again."""

    round: int
    factors: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    trainable: set[str]


def fresh_lora(factors: Mapping[str, np.ndarray], seed: int | Sequence[int]) -> dict[str, np.ndarray]:
    """peft's LoRA init in numpy: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in factors.items():
        if is_a_key(k):
            bound = 1.0 / np.sqrt(v.shape[1])
            out[k] = rng.uniform(-bound, bound, size=v.shape).astype(np.float32)
        else:
            out[k] = np.zeros_like(v)
    return out


class StepTiming(NamedTuple):
    """How a step's transfers went, as the edge sees them; `EdgeClient._observe` turns them into the rate
    estimates of a channel-aware codec policy. Measured on the edge alone (no clock is shared with the server);
    the times err long rather than short, so the rates err low (coarser codecs than needed, budgets kept).

    up_s: from gRPC taking the step's first message until the first reply message arrives, less the server's
    compute (StepResult "server_s"). Besides the uplink transfer it holds both latencies, any server queueing
    and the downlink transfer of that first message (`first_down_bytes`, which `_observe` takes off at the
    downlink estimate). Not the time until gRPC's writes complete (`written_s`, kept as a lower bound): writes
    complete once the bytes sit in HTTP/2's window, the socket buffers or a shaping proxy's (4 MiB), so a whole
    MiniLM step (1.2 MB raw) would look instantaneous.
    down_s: when grad_h came in several frames (a policy that steers the downlink has the server send 64 KiB
    frames), the time from the first frame's arrival to the last's, for the bytes after the first
    (`down_bytes`): the link's pace, independent of the uplink. With one frame, from the write of the step's
    end_step completing to the reply's end, less the server's compute: that also holds the uplink's buffered
    tail (the whole step when it fits in those buffers), both latencies and any queueing, so the rate reads low,
    most when the uplink is the slow direction. None where not measured."""

    up_bytes: int
    up_s: float | None
    down_bytes: int
    down_s: float | None
    codec_down: str | None  # the codec grad_h came in
    first_down_bytes: int = 0
    written_s: float | None = None


class _StepStream:
    """One Train (or Evaluate) call driven in lock-step: put a step's messages, read until its end_step.
    `last` holds the timing of the last step (StepTiming)."""

    def __init__(self, rpc: Callable[..., Iterator[Any]], metadata: Any = None):
        self._q: queue.Queue[Any] = queue.Queue()
        self._taken: float | None = None  # when gRPC took the step's first message
        self._written: float | None = None  # when the write of its end_step completed
        self._sent = threading.Event()
        self.last: StepTiming | None = None
        self._replies = rpc(self._requests(), metadata=metadata)

    def _requests(self) -> Iterator[Any]:
        """The request iterator gRPC consumes: it asks for a message once the previous one is written."""
        while True:
            m = self._q.get()
            if m is None:
                return
            if self._taken is None:
                self._taken = time.perf_counter()
            yield m
            if m.WhichOneof("body") == "end_step":
                self._written = time.perf_counter()
                self._sent.set()

    def step(self, messages: Iterable[Any]) -> tuple[dict[str, np.ndarray], pb.StepResult]:
        msgs = list(messages)
        self._taken, self._written = None, None
        self._sent.clear()
        for m in msgs:
            self._q.put(m)
        asm = Assembler()
        down, codec, first = 0, None, None
        frames: list[tuple[float, int]] = []  # (arrival, bytes) of each reply frame
        for reply in self._replies:
            now = time.perf_counter()
            first = first or now
            down += reply.ByteSize()
            if reply.WhichOneof("body") == "frame":
                codec = codec or reply.frame.codec or "raw"
                frames.append((now, reply.ByteSize()))
                asm.add(reply.frame)
            else:
                done = time.perf_counter()
                up_s = down_s = None
                server_s = float(reply.end_step.metrics.get("server_s", 0.0))
                written_s = None
                if self._sent.wait(1.0) and self._taken is not None and self._written is not None:
                    up_s = first - self._taken - server_s
                    down_s = done - self._written - server_s
                    written_s = self._written - self._taken
                if len(frames) > 1:  # the frames' pace, after the first
                    down, down_s = sum(b for _, b in frames[1:]), frames[-1][0] - frames[0][0]
                first_bytes = frames[0][1] if frames else reply.ByteSize()
                up = sum(m.ByteSize() for m in msgs)
                self.last = StepTiming(up, up_s, down, down_s, codec, first_bytes, written_s)
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
    """One edge taking part in a run: join, fetch the bundle, train rounds until the server says stop.

    `make_backend(bundle folder, settings)` makes the compute backend once the bundle is there (default:
    ONNX Runtime, `EdgeRuntime`); `opts.backend` is the name declared to the server.
    """

    # set by setup()
    manifest: BundleManifest  # as the server sent it at Join
    data: TokenDataset
    batcher: Batcher
    num_samples: int
    shapes: dict[str, tuple[int, ...]]
    ranks: RankAdapter

    def __init__(self, target: str, opts: ClientOptions | None = None, make_backend: BackendFactory | None = None):
        self.target = target
        self.opts = opts or ClientOptions()
        self.meter = ByteMeter()
        self.opts.cache_dir = Path(self.opts.cache_dir)
        options = [*CHANNEL_OPTIONS, *self.opts.channel_options]
        self._channel = (
            grpc.secure_channel(target, self.opts.credentials, options=options)
            if self.opts.credentials
            else grpc.insecure_channel(target, options=options)
        )
        self.stub = MeteredStub(self._channel, self.meter, self.opts.name or "edge")
        self.retrier = Retrier(target, self.opts.retry, tls=self.opts.credentials is not None)
        if make_backend is None:
            if self.opts.backend != DEFAULT_BACKEND:
                raise ValueError(
                    f"backend {self.opts.backend!r} is not built into the edge client: pass its factory as "
                    f"make_backend (the torch reference: splitwave.server.torch_edge.torch_backend)"
                )
            make_backend = EdgeRuntime.from_settings
        self._make_backend: BackendFactory = make_backend
        self._runtime: EdgeBackend | None = None
        self._joined: pb.JoinReply | None = None
        self.history: list[dict[str, Any]] = []
        self.rejoins = 0
        self._resume_secret = ""
        self._round_start: _RoundStart | None = None
        # error-feedback residuals of "up" (h) and "adapter_up" (RunConfig.error_feedback); reset at every Join
        self.feedback = ErrorFeedback()
        self._t0 = time.perf_counter()
        # this edge's link rates (bytes/s) from its own Train steps, for a channel-aware codec policy
        self.rate_up, self.rate_down = RateEstimator(), RateEstimator()

    @property
    def joined(self) -> pb.JoinReply:
        """The server's answer to the last Join (session, run, config, manifest)."""
        if self._joined is None:
            raise EdgeError("not joined yet: call join() or setup() first")
        return self._joined

    @property
    def runtime(self) -> EdgeBackend:
        """The compute backend (made by setup())."""
        if self._runtime is None:
            raise EdgeError("no backend yet: call setup() first")
        return self._runtime

    def _call(self, fn: Callable[[float], T], what: str) -> T:
        """`fn(time_left_s)` under the retry policy; UNAUTHENTICATED on an existing session -> SessionLost."""
        try:
            return self.retrier.call(fn, what)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and self._joined is not None:
                raise SessionLost(f"{what}: {e.details()}") from None
            raise

    def _rejoining(self, fn: Callable[[], T], doing: str, restart: Callable[[], None] | None = None) -> T:
        """`fn()`; a lost session is rejoined and `fn()` called again (after `restart()`), at most MAX_REJOINS
        times in a row: beyond that, someone else keeps taking the name."""

        def recover(e: SessionLost) -> None:
            self.rejoin(str(e))
            if restart is not None:
                restart()

        try:
            return recovering(fn, SessionLost, recover, MAX_REJOINS)
        except SessionLost as e:
            raise EdgeError(f"session lost {MAX_REJOINS + 1} times in a row {doing} ({e})") from None

    # -- setup ---------------------------------------------------------------------------------------------
    def _secret_file(self) -> Path | None:
        """Where the resume secret of a named client is kept between runs of this process (owner-only file),
        so that a restarted edge can take its session back."""
        if not self.opts.name:
            return None
        key = hashlib.sha256(f"{self.target}|{self.opts.name}".encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.opts.name)[:64]
        return self.opts.cache_dir / "sessions" / f"{safe}-{key}.json"

    def _load_secret(self) -> str:
        path = self._secret_file()
        try:
            return json.loads(path.read_text())["resume_secret"] if path else ""
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def _save_secret(self) -> None:
        path = self._secret_file()
        if not path or not self._resume_secret:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "server": self.target,
                    "client_id": self.joined.client_id,
                    "run_id": self.joined.run_id,
                    "resume_secret": self._resume_secret,
                },
                f,
            )
        os.replace(tmp, path)

    def join(self) -> pb.JoinReply:
        """Join (or, with an existing session, rejoin under the same name with the resume secret)."""
        previous = self._joined
        name = previous.client_id if previous is not None else self.opts.name
        secret = self._resume_secret or self._load_secret()
        cached = [p.parent.name for p in self.opts.cache_dir.glob(f"*/{MANIFEST_FILE}")]  # complete bundles only
        caps = pb.Capabilities(
            protocol_version=1,
            backend=self.opts.backend,
            codecs=list(CODECS),
            training_modes=["recompute", "saved"],
            cached_bundle_hashes=cached,
        )
        req = pb.JoinRequest(
            client_name=name, enrollment_secret=self.opts.enrollment_secret, capabilities=caps, resume_secret=secret
        )
        reached = self.retrier.reached
        # not _call: UNAUTHENTICATED here is a refused enrollment (or resume secret), not a lost session
        joined = self.retrier.call(
            lambda left: self.stub.Join(req, timeout=JOIN_TIMEOUT_S if reached else min(left, JOIN_TIMEOUT_S)), "Join"
        )
        if previous is not None and joined.run_id != previous.run_id:
            raise EdgeError(
                f"{self.target} now runs another run ({joined.run_id}, was {previous.run_id}): "
                f"start the edge again to join it"
            )
        if previous is not None and joined.bundle_hash != previous.bundle_hash:
            raise EdgeError(f"{self.target} now serves another bundle: start the edge again")
        self._joined = joined
        self.feedback.reset()  # the server starts this session afresh: residuals of the old one are stale
        self.stub.client_key = joined.client_id
        if joined.resume_secret:
            self._resume_secret = joined.resume_secret
            self._save_secret()
        log.info(
            "%s %s as %s (run %s, round %d)",
            "rejoined" if previous else "joined",
            self.target,
            joined.client_id,
            joined.run_id,
            joined.current_round,
        )
        return joined

    def rejoin(self, why: str) -> pb.JoinReply:
        self.rejoins += 1
        log.warning("session lost (%s): rejoining as %s", why, self.joined.client_id)
        return self.join()

    def _header(self, round_idx: int = 0, step: int = 0) -> pb.Header:
        return pb.Header(session_token=self.joined.session_token, run_id=self.joined.run_id, round=round_idx, step=step)

    def fetch_bundle(self) -> Path:
        """The bundle folder, downloaded once per bundle hash and verified file by file."""
        target = self.opts.cache_dir / self.joined.bundle_hash
        if (target / MANIFEST_FILE).exists():
            log.info("bundle %s cached in %s", self.joined.bundle_hash[:12], target)
            return target
        t0 = time.perf_counter()
        self._call(lambda _: self._download(target), "GetBundle")
        log.info(
            "bundle %s downloaded to %s (%.1f MB in %.1f s)",
            self.joined.bundle_hash[:12],
            target,
            sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 1e6,
            time.perf_counter() - t0,
        )
        return target

    def _download(self, target: Path) -> None:
        tmp = self.opts.cache_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            handles: dict[str, IO[bytes]] = {}
            hashes: dict[str, Any] = {}  # hashlib's sha256 objects
            expect: dict[str, tuple[str, int]] = {}
            try:
                for chunk in self.stub.GetBundle(
                    pb.BundleRequest(header=self._header(), bundle_hash=self.joined.bundle_hash)
                ):
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
            finally:
                for fh in handles.values():
                    fh.close()
            for name in handles:
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

    def _make_runtime(self, bundle: Path) -> EdgeBackend:
        cfg = self.joined.config
        opt = cfg.optimizer
        settings = BackendSettings(
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
            mode=cfg.training_mode or "recompute",
            threads=self.opts.threads,
        )
        return self._make_backend(bundle, settings)

    def setup(self) -> None:
        self.join()
        cfg = self.joined.config
        spec = json.loads(cfg.shard.spec_json)
        try:  # before the (long) bundle download: a device without its data should learn it at once
            check_data(spec, self.opts.data_dir)
        except (DataNotFound, ValueError):
            self.leave("dataset missing")  # free the slot for when the data is there
            raise
        # the same manifest.json the bundle holds; checked before the download, since it comes over the wire
        self.manifest = BundleManifest.from_json(
            self.joined.manifest_json, f"the bundle manifest in the JoinReply of {self.target}"
        )
        bundle = self._rejoining(self.fetch_bundle, "while fetching the bundle")
        self._runtime = self._make_runtime(bundle)
        tok = bundle if self.manifest.tokenizer_files else None
        self.data = build_token_dataset(spec, tok, self.opts.data_dir)
        indices = np.asarray(cfg.shard.indices, dtype=np.int64)
        if len(indices) and (indices.max() >= len(self.data) or indices.min() < 0):
            raise EdgeError(f"shard indices out of range for a dataset of {len(self.data)} rows")
        self.batcher = Batcher(indices, cfg.batch_size, cfg.seed, client_id=cfg.shard.shard_index)
        self.num_samples = len(indices)
        self.shapes = self.manifest.factor_shapes()
        lora = self.manifest.lora
        self.ranks = RankAdapter(lora.r, lora.alpha, lora.rslora)
        log.info(
            "%d training samples (%s), batch %d, %d local steps per round",
            self.num_samples,
            spec["dataset"],
            cfg.batch_size,
            cfg.local_steps,
        )

    # -- rounds --------------------------------------------------------------------------------------------
    def await_round(self, round_idx: int, no_wait: bool) -> pb.RoundDirectives:
        def call(_: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pb.RoundDirectives | None]:
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

        factors, deltas, d = self._call(call, "AwaitRound")
        if d is None:
            raise EdgeError("AwaitRound ended without directives")
        if deltas:  # FedEx-LoRA / FLoRA: the running sum of residuals folded into the frozen weights
            self.runtime.set_base_deltas(deltas)
        factors = self.ranks.to_graph(factors, self.shapes)  # a smaller rank than the bundle's: zero-padded
        if d.reinit:  # FLoRA: a fresh adapter (at this client's rank) after the merge
            fresh = fresh_lora(
                self.runtime.factors, seed=[self.joined.config.seed, self.batcher.client_id, d.next_round]
            )
            self.ranks.set_rank([k for k in fresh if k not in factors], d.rank)
            self.runtime.set_factors(self.ranks.mask({k: v for k, v in fresh.items() if k not in factors}))
            self.runtime.reset_optimizer()
        if factors:
            self.runtime.set_factors(factors)
        self.runtime.trainable = set(d.trainable_factors) or set(self.runtime.factor_names)
        return d

    def _batch(self, round_idx: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return round_batch(self.data, self.batcher, self.joined.config.local_steps, round_idx, step)

    def step_codecs(self, h: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> tuple[pb.CodecSpec | str, str]:
        """(h's codec, the grad_h codec to ask for; "" = the run's): the run's fixed codecs, or under a
        channel-aware policy the choice for this step from the rate estimates (link latency unknown here: 0)."""
        cfg = self.joined.config
        policy = CodecPolicy.from_proto(cfg.codec_policy, CODECS)
        if policy.kind == "fixed":
            return cfg.codec_up, ""
        shape, extra = step_shapes(h, mask, labels, cfg.packed_steps)  # as the step travels (packed or padded)
        up = policy.choose("up", h.dtype.name, shape, self.rate_up.rate, 0.0, extra)
        down = policy.choose("down", "float32", shape, self.rate_down.rate)
        return up or cfg.codec_up, down or ""

    def _observe(self, timing: StepTiming | None) -> None:
        """A finished step's transfers update the rate estimates (see StepTiming): the downlink first, then the
        uplink, less the first reply message's transfer at the downlink estimate, never below the writes' time."""
        if timing is None:
            return
        if timing.down_s is not None:
            self.rate_down.observe(timing.down_bytes, timing.down_s)
        if timing.up_s is not None:
            up_s, down = timing.up_s, self.rate_down.rate
            if np.isfinite(down) and down > 0:
                up_s -= timing.first_down_bytes / down
            self.rate_up.observe(timing.up_bytes, max(up_s, timing.written_s or 0.0))

    def train_round(self, round_idx: int) -> dict[str, Any]:
        cfg = self.joined.config
        stream: _StepStream | None = None
        losses: list[float] = []
        correct, count = 0, 0
        steps_done = 0

        def send(msgs: list[pb.TrainRequest]) -> tuple[dict[str, np.ndarray], pb.StepResult]:
            nonlocal stream
            if stream is None:  # (re)open: a resent step with identical bytes is answered, not trained twice
                stream = _StepStream(self.stub.Train)
            try:
                return stream.step(msgs)
            except grpc.RpcError:
                stream.close()
                stream = None
                raise

        try:
            for step in range(cfg.local_steps):
                ids, mask, labels = self._batch(round_idx, step)
                t0 = time.perf_counter()
                h = self.runtime.forward(ids, mask)
                t_fwd = time.perf_counter() - t0
                enc = self.feedback.encode if "up" in cfg.error_feedback else encode
                codec_up, codec_down = self.step_codecs(h, mask, labels)
                sent = build_step(h, mask, labels, codec_up, packed=cfg.packed_steps, encode=enc)
                header = self._header(round_idx, step)
                msgs = sent.messages(pb.TrainRequest, header, {"edge_fwd_s": t_fwd}, codec_down=codec_down)
                up0, down0 = self.meter.total(direction="up"), self.meter.total(direction="down")
                t1 = time.perf_counter()
                tensors, res = self._call(lambda _: send(msgs), f"Train round {round_idx} step {step}")
                t_net = time.perf_counter() - t1
                timing = stream.last if stream is not None else None
                # the estimates this step's codecs were chosen with (None: none yet, or not finite)
                rates = [r if np.isfinite(r) else None for r in (self.rate_up.rate, self.rate_down.rate)]
                self._observe(timing)
                if res.stop_local_work:
                    break
                t2 = time.perf_counter()
                grads = self.runtime.backward(sent.grad_h(tensors))  # a packed grad_h unpacked
                self.runtime.step(self.ranks.mask(grads) if self.ranks.ranks else grads)
                t_end = time.perf_counter()
                t_bwd = t_end - t2
                steps_done += 1
                losses.append(res.loss)
                correct += res.correct
                count += res.count
                rec = {
                    "kind": "step",
                    "client": self.joined.client_id,
                    "round": round_idx,
                    "step": step,
                    "loss": res.loss,
                    "batch": int(len(labels)),
                    "seq": int(ids.shape[1]),
                    "edge_fwd_s": t_fwd,
                    "edge_bwd_s": t_bwd,
                    "server_s": res.metrics.get("server_s", 0.0),
                    "roundtrip_s": t_net,
                    "step_s": t_end - t0,
                    "bytes_up": self.meter.total(direction="up") - up0,
                    "bytes_down": self.meter.total(direction="down") - down0,
                    "codec_up": msgs[0].frame.codec or "raw",
                    "codec_down": timing.codec_down if timing is not None else None,
                    "rate_up_Bps": rates[0],
                    "rate_down_Bps": rates[1],
                    "time": time.time(),
                }
                self._record(rec)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("round %d ended for us early: %s", round_idx, e.details())
            return {"steps": steps_done, "closed": True}
        except SessionLost:
            raise
        except EdgeError as e:  # the server ended the stream without answering (e.g. it is shutting down)
            log.warning("round %d: %s", round_idx, e)
            return {"steps": steps_done, "closed": True}
        finally:
            if stream is not None:
                stream.close()
        return {
            "steps": steps_done,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_accuracy": correct / max(count, 1),
            "closed": False,
        }

    def push_adapter(self, round_idx: int, upload: list[str], stats: dict[str, Any]) -> pb.AdapterReply | None:
        keys = upload or list(self.runtime.factors)
        header = self._header(round_idx, stats.get("steps", 0))

        cfg = self.joined.config
        codec = adapter_codec_up(cfg)
        enc = self.feedback.encode if "adapter_up" in cfg.error_feedback else encode
        # encoded once: a retried push resends the same bytes (and error feedback moves its residual once)
        frames = [f for k in keys for f in enc(k, self.ranks.from_graph(k, self.runtime.factors[k]), codec)]

        def messages() -> Iterator[pb.AdapterRequest]:
            for f in frames:
                yield pb.AdapterRequest(header=header, frame=f)
            yield pb.AdapterRequest(
                header=header,
                end=pb.AdapterEnd(
                    num_samples=self.num_samples,
                    local_steps=stats.get("steps", 0),
                    metrics={k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
                ),
            )

        t0 = time.perf_counter()
        up0 = self.meter.total(direction="up", method="PushAdapter")
        try:
            reply = self._call(lambda _: self.stub.PushAdapter(messages()), "PushAdapter")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("adapter of round %d refused: %s", round_idx, e.details())
            return None
        self._record(
            {
                "kind": "push",
                "client": self.joined.client_id,
                "round": round_idx,
                "bytes_up": self.meter.total(direction="up", method="PushAdapter") - up0,
                "push_s": time.perf_counter() - t0,
                "time": time.time(),
                **stats,
            }
        )
        return reply

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.opts.metrics_path is not None:
            with open(self.opts.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run(self) -> dict[str, Any]:
        """Take part in rounds until the server says stop; returns a summary."""
        if self._runtime is None:
            self.setup()
        r, no_wait = self.joined.current_round, True

        def restart() -> None:  # after a rejoin (a server restart): take the server's round from its start
            nonlocal r, no_wait
            r, no_wait = self.joined.current_round, True

        rounds = 0
        last: dict[str, Any] = {}
        while True:
            d, rec = self._rejoining(lambda: self._take_part(r, no_wait), "without finishing a round", restart)
            if rec is None:
                break
            r, no_wait = d.next_round, False
            last = rec
            rounds += 1
        self.leave("done")
        summary = {
            "client": self.joined.client_id,
            "server": self.target,
            "rounds": rounds,
            "stop_reason": d.stop_reason,
            "bytes_up": self.meter.total(direction="up"),
            "bytes_down": self.meter.total(direction="down"),
            "wall_s": time.perf_counter() - self._t0,
            "retries": self.retrier.retries,
            "rejoins": self.rejoins,
            "peak_rss_bytes": peak_rss_bytes(),
            "last_round": {k: last[k] for k in ("round", "steps", "train_loss", "train_accuracy") if k in last},
            "final_metrics": dict(d.metrics),
        }
        self._record({"kind": "summary", "time": time.time(), **summary})
        return summary

    def _take_part(self, after_round: int, no_wait: bool) -> tuple[pb.RoundDirectives, dict[str, Any] | None]:
        """Wait for the round after `after_round`, train it and push the adapter: (directives, the round's
        record), or (directives, None) when the server says stop."""
        d = self.await_round(after_round, no_wait=no_wait)
        if d.stop:
            return d, None
        r = d.next_round
        self._begin_round(r)
        t0 = time.perf_counter()
        up0, down0 = self.meter.total(direction="up"), self.meter.total(direction="down")
        stats = self.train_round(r)
        if not stats.pop("closed"):
            self.push_adapter(r, list(d.upload_factors), stats)
        rec = {
            "kind": "round",
            "client": self.joined.client_id,
            "round": r,
            "wall_s": time.perf_counter() - t0,
            "time": time.time(),
            "bytes_up": self.meter.total(direction="up") - up0,
            "bytes_down": self.meter.total(direction="down") - down0,
            **stats,
        }
        self._record(rec)
        log.info("%s", round_line(rec))
        return d, rec

    def _begin_round(self, round_idx: int) -> None:
        """Snapshot the state a round starts from; if the server hands out the same round again (it restarted
        from a checkpoint taken before that round ended), go back to that state so the redo is exact."""
        rt = self.runtime
        start = self._round_start
        if start is not None and start.round == round_idx:
            log.warning("round %d handed out again (server restarted): rolling back to its start", round_idx)
            self.feedback.reset()  # residuals of the round being redone would be applied twice
            rt.set_factors(start.factors)
            rt.load_optimizer_state(start.optimizer)
            rt.trainable = set(start.trainable)
            return
        self._round_start = _RoundStart(
            round_idx,
            {k: np.array(v, copy=True) for k, v in rt.factors.items()},
            rt.optimizer_state(),
            set(rt.trainable),
        )

    def leave(self, reason: str) -> None:
        """Best effort, once: a server that is gone frees the slot by itself."""
        try:
            self.stub.Leave(pb.LeaveRequest(header=self._header(), reason=reason), timeout=10)
        except grpc.RpcError as e:
            log.warning("Leave failed: %s", e.details())

    def close(self) -> None:
        self._channel.close()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPLITWAVE_EDGE_CACHE", ".cache/edge"))


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def round_line(rec: Mapping[str, Any]) -> str:
    """One progress line per round: round, steps, loss, accuracy, bytes up/down, time."""
    loss, acc = rec.get("train_loss"), rec.get("train_accuracy")
    perf = f"loss {loss:.4f}, accuracy {acc:.3f}" if loss is not None else "round closed before its end"
    return (
        f"round {rec['round']}: {rec.get('steps', 0)} steps, {perf}, up {_mb(rec['bytes_up'])}, "
        f"down {_mb(rec['bytes_down'])}, {rec['wall_s']:.1f} s"
    )


def format_summary(s: Mapping[str, Any]) -> str:
    """The edge's final summary, for people (the same fields go to --metrics as a JSON line)."""
    lines = [f"edge {s['client']} done: {s['rounds']} rounds with {s['server']} (stop: {s['stop_reason'] or '-'})"]
    lr = s.get("last_round") or {}
    if "train_loss" in lr:
        lines.append(
            f"  last round ({lr['round']}): {lr['steps']} steps, train loss {lr['train_loss']:.4f}, "
            f"train accuracy {lr['train_accuracy']:.3f}"
        )
    evals = {k: v for k, v in (s.get("final_metrics") or {}).items() if k.startswith("eval_")}
    if evals:  # the rest (aggregation details) is in --metrics / --json
        lines.append("  global model: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(evals.items())))
    lines.append(f"  traffic: {_mb(s['bytes_up'])} up, {_mb(s['bytes_down'])} down")
    lines.append(f"  time: {s['wall_s']:.1f} s; retries {s['retries']}, rejoins {s['rejoins']}")
    lines.append(f"  peak RSS: {s['peak_rss_bytes'] / 2**20:.0f} MiB (whole process)")
    return "\n".join(lines)
