"""The gRPC face of the server: decode frames, call `SplitServer`, encode replies. Nothing else.

Every failure becomes a gRPC status with a message that names the problem; the servicer never lets an
exception from one client's request touch another client's state.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import signal
import socket
import threading
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitwave.common.codec_policy import CodecPolicy
from splitwave.common.config import LimitsConfig
from splitwave.common.lora import FACTOR_SUFFIXES
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import (
    CODECS,
    MAX_FRAME_BYTES,
    Assembler,
    CodecError,
    encode,
    factor_codec,
    factor_codecs_accepted,
)
from splitwave.protos.metering import ByteMeter, add_metered_servicer_to_server, reflection_service_names
from splitwave.protos.steps import ROW_LENGTHS, grad_frames
from splitwave.server.app import SplitServer
from splitwave.server.errors import ServiceError
from splitwave.server.peers import CallGuard
from splitwave.server.sessions import PROTOCOL_VERSION, Session
from splitwave.server.validation import STEP_TENSORS, step_byte_limit

log = logging.getLogger(__name__)

BUNDLE_CHUNK = (1 << 20) - 4096  # file bytes per chunk, so each message stays under 1 MiB
AWAIT_TIMEOUT_S = 3600.0
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES + (64 << 10)  # one frame plus its header: anything bigger is refused by gRPC
SPARE_RPC_THREADS = 8  # Join, health checks, reflection
BACKENDS = ("onnxruntime", "torch", "custom")  # Capabilities.backend; "custom": a client's own edge code
TRAINING_MODES = ("recompute", "saved")


def peer_names(context) -> tuple[str, ...]:
    """Every name of the client certificate under mTLS (common name first, then SANs); () without one."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - no auth context on insecure channels in some grpc builds
        return ()
    names = list(auth.get("x509_common_name") or []) + list(auth.get("x509_subject_alternative_name") or [])
    return tuple(dict.fromkeys(n.decode(errors="replace") for n in names))


def peer_identity(context) -> str:
    """The client certificate's identity under mTLS (its common name, else its first SAN; "" without one):
    sessions are bound to it."""
    names = peer_names(context)
    return names[0] if names else ""


def _abort(context, code: str, message: str):
    context.abort(getattr(grpc.StatusCode, code), message)


def check_capabilities(caps, codec_up: str, codec_down: str) -> None:
    """What the proto requires of `Capabilities`, checked before anything else of a Join: unset or unknown
    values are refused naming the accepted ones, never guessed."""
    if caps.protocol_version == 0:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"capabilities.protocol_version is unset (0); this server speaks version {PROTOCOL_VERSION}",
        )
    if caps.protocol_version != PROTOCOL_VERSION:
        raise ServiceError(
            "FAILED_PRECONDITION",
            f"protocol version {caps.protocol_version} unsupported (server speaks {PROTOCOL_VERSION})",
        )
    if caps.backend not in BACKENDS:
        raise ServiceError(
            "INVALID_ARGUMENT", f"capabilities.backend {caps.backend[:64]!r} unknown; expected one of {list(BACKENDS)}"
        )
    unknown = sorted(set(caps.codecs) - set(CODECS)) or sorted(set(caps.training_modes) - set(TRAINING_MODES))
    if unknown:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"capabilities name unknown codecs/training modes {unknown[:3]}; "
            f"codecs are {list(CODECS)}, training modes {list(TRAINING_MODES)}",
        )
    need = sorted({codec_up, codec_down} - set(caps.codecs) - {"raw"})
    if need:  # an empty list means "raw only"
        raise ServiceError(
            "FAILED_PRECONDITION",
            f"this run needs codecs {need}, which the client does not declare in capabilities.codecs",
        )


def _codec_spec(name: str, fraction: float) -> pb.CodecSpec:
    return pb.CodecSpec(codec=name, topk_fraction=fraction if name == "topk" else 0.0)


def adapter_codecs(training, codecs: list[str]) -> tuple[str, str]:
    """(up, down) LoRA factor codecs for a client that declares `codecs`: the run's, or where the client lacks
    one (a client from before "int4"), what a run without adapter codecs uses: factor_codec(codec_up), raw."""
    have = {"raw", *codecs}
    up = training.adapter_codec_up if training.adapter_codec_up in have else factor_codec(training.codec_up)
    down = training.codec_adapter_down if training.codec_adapter_down in have else "raw"
    return up, down


class SplitWaveServicer(pb_grpc.SplitWaveServicer):
    def __init__(self, app: SplitServer):
        self.app = app
        cfg = app.cfg
        self.codec_down = _codec_spec(cfg.training.codec_down, cfg.training.topk_fraction)
        self.factor_codecs = factor_codecs_accepted(cfg.training.adapter_codec_up)  # on PushAdapter frames
        self.error_feedback = frozenset(cfg.training.error_feedback)
        # a channel-aware policy lets each step ask for its grad_h codec (StepEnd.codec_down) from its ladder
        self.codec_policy = CodecPolicy.from_config(cfg.training.codec_policy)
        self.codecs_down = {
            c: _codec_spec(c, cfg.training.topk_fraction)
            for c in self.codec_policy.allowed_down(cfg.training.codec_down)
        }
        self.max_tensor_bytes = cfg.server.max_tensor_bytes
        # what one step or one adapter upload can legitimately need (x4 slack on batch and rank): an
        # authenticated peer cannot make the server reserve more than this per call
        hidden = app.manifest.hidden_size
        self.step_bytes = step_byte_limit(cfg.training.batch_size, cfg.data.max_seq_len, hidden, self.max_tensor_bytes)
        sizes = [int(np.prod(f.shape)) * 4 for f in app.manifest.factors]
        self.adapter_bytes = min(self.max_tensor_bytes, 4 * sum(sizes) + (64 << 10))
        self.active = Counter()  # open calls per method: shows that streams of vanished clients are cleaned up
        self._active_lock = threading.Lock()
        self.limits = cfg.server.limits
        self.guard = CallGuard(self.limits, cfg.num_clients)

    @contextlib.contextmanager
    def _track(self, method: str, context, stream: bool = False):
        with self._active_lock:
            self.active[method] += 1
        try:
            with self.guard.call(context, method, stream) as call:
                yield call
        finally:
            with self._active_lock:
                self.active[method] -= 1

    def limits_message(self) -> pb.Limits:
        """The limits a client is told at Join (what exceeding them is answered with: see the proto)."""
        cfg = self.app.cfg
        return pb.Limits(
            max_frame_bytes=MAX_FRAME_BYTES,
            min_frame_bytes=self.limits.min_frame_bytes,
            # what a step or an adapter upload may decode to (each <= server.max_tensor_bytes)
            max_tensor_bytes=max(self.step_bytes, self.adapter_bytes),
            max_message_bytes=MAX_MESSAGE_BYTES,
            # set by the metrics-cap and value-bound guards where the config has them (0: none)
            max_metrics_entries=cfg.server.security.max_metrics_entries,
            max_abs_value=cfg.server.security.max_abs_value,
        )

    # -- helpers -------------------------------------------------------------------------------------------
    def _session(self, header, context, call=None) -> Session:
        """The session of a call's header; `call` (the guard's record) then counts as that client's."""
        if self.app.closing:
            _abort(context, "UNAVAILABLE", "the server is shutting down; retry")
        try:
            s = self.app.session(header.session_token, header.run_id, peer_names(context))
            if call is not None:
                self.guard.authenticate(call, s.client_id)
            return s
        except ServiceError as e:
            _abort(context, e.code, str(e))

    def _assembler(self, limit: int) -> Assembler:
        return Assembler(max_tensor_bytes=limit, max_total_bytes=limit)

    def _guard(self, context, fn, *args):
        """Run app logic, mapping its errors to statuses."""
        try:
            return fn(*args)
        except ServiceError as e:
            _abort(context, e.code, str(e))
        except CodecError as e:
            _abort(context, "RESOURCE_EXHAUSTED" if e.code == "too_large" else "INVALID_ARGUMENT", str(e))

    def _add_frame(self, asm: Assembler, frame, context):
        """One frame into the assembler; a frame that is not its tensor's last must carry at least
        `min_frame_bytes` (tiny frames multiply per-frame work: 49,152 one-byte frames of a legal h cost seconds)."""
        if frame.frame_index + 1 < frame.frame_count:
            size = len(frame.payload) + len(frame.scales) + len(frame.indices)
            if size < self.limits.min_frame_bytes:
                _abort(
                    context,
                    "INVALID_ARGUMENT",
                    f"frame {frame.frame_index} of tensor {frame.name[:64]!r} "
                    f"carries {size} bytes; frames other than a tensor's last "
                    f"must carry at least {self.limits.min_frame_bytes}",
                )
        try:
            asm.add(frame)
        except CodecError as e:
            _abort(context, "RESOURCE_EXHAUSTED" if e.code == "too_large" else "INVALID_ARGUMENT", str(e))

    def _step_codec_down(self, asked: str, context) -> pb.CodecSpec:
        """grad_h's codec for this step: the run's codec_down, or the one the step asked for (StepEnd.codec_down),
        which must be the run's or in its policy's ladder."""
        if not asked:
            return self.codec_down
        spec = self.codecs_down.get(asked)
        if spec is None:
            steered = self.codec_policy.steers("down")
            _abort(
                context,
                "INVALID_ARGUMENT",
                f"StepEnd.codec_down {asked[:16]!r} is not a codec this run sends grad_h in: "
                f"{list(self.codecs_down)} ("
                + (
                    "training.codec_down and the policy's ladder"
                    if steered
                    else "training.codec_down; its codec policy does not steer the downlink"
                )
                + ")",
            )
        return spec

    def _finish(self, asm: Assembler, context) -> dict[str, np.ndarray]:
        try:
            return asm.finish()
        except CodecError as e:
            _abort(context, "INVALID_ARGUMENT", str(e))

    def _grad_frames(
        self, s: Session, res, row_lengths: np.ndarray | None, codec: pb.CodecSpec
    ) -> list[pb.TensorFrame]:
        """grad_h's frames in this step's codec (`_step_codec_down`), packed like the step's "h" when the step
        came packed (`row_lengths`), in 64 KiB frames when a codec policy steers the downlink (the edge times
        them); with error feedback on "down" from the client's residual, and a retried step (the server's
        cached result) gets the frames sent before: the same bytes, the residual moved once."""
        if "down" not in self.error_feedback:
            return grad_frames(res.grad_h, row_lengths, codec, self._framed(encode))
        w = s.wire
        if w.last_grad is None or w.last_grad[0] is not res:
            w.last_grad = (res, grad_frames(res.grad_h, row_lengths, codec, self._framed(w.feedback.encode)))
        return w.last_grad[1]

    def _framed(self, enc):
        """`enc` with grad_h's frame size (`CodecPolicy.grad_frame_bytes`); itself at the usual 1 MiB."""
        size = self.codec_policy.grad_frame_bytes
        return enc if size == MAX_FRAME_BYTES else (lambda name, array, codec="raw": enc(name, array, codec, size))

    def _factor_frames(self, s: Session, d) -> list[pb.TensorFrame]:
        """The round's factors for this client in its adapter codec; with error feedback on "adapter_down" a
        retried AwaitRound of the same assignment gets the frames sent before (as `_grad_frames`)."""
        codec = s.wire.adapter_down
        ef = "adapter_down" in self.error_feedback and codec != "raw"
        w = s.wire
        if ef and w.last_factors is not None and w.last_factors[0] is d:
            return w.last_factors[1]
        enc = w.feedback.encode if ef else encode
        frames = [
            f for k, v in d.load_factors.items() for f in enc(k, np.ascontiguousarray(v, dtype=np.float32), codec)
        ]
        if ef:
            w.last_factors = (d, frames)
        return frames

    # -- RPCs ----------------------------------------------------------------------------------------------
    def Join(self, request, context):
        with self._track("Join", context):
            return self._join(request, context)

    def _join(self, request, context):
        if self.app.closing:
            _abort(context, "UNAVAILABLE", "the server is shutting down; retry")
        caps = request.capabilities
        self._guard(context, check_capabilities, caps, self.app.cfg.training.codec_up, self.app.cfg.training.codec_down)
        s, current, resume = self._guard(
            context,
            self.app.join,
            request.client_name,
            request.enrollment_secret,
            caps.backend,
            list(caps.codecs),
            list(caps.training_modes),
            caps.protocol_version,
            peer_identity(context),
            request.resume_secret,
            peer_names(context),
        )
        cfg, tr = self.app.cfg, self.app.cfg.training
        adapter_up, s.wire.adapter_down = adapter_codecs(tr, list(caps.codecs))
        idx = self.app.shard_indices(s)
        shard = pb.DataShard(
            dataset=cfg.data.dataset,
            split=self.app.train_spec["split"],
            shard_index=s.shard_index,
            num_shards=len(self.app.shards),
            partition=cfg.data.partition,
            dirichlet_alpha=cfg.data.dirichlet_alpha,
            seed=cfg.seed,
            indices=idx.tolist(),
            num_samples=len(idx),
            spec_json=json.dumps(self.app.train_spec),
        )
        run = pb.RunConfig(
            learning_mode=tr.mode,
            codec_up=_codec_spec(tr.codec_up, tr.topk_fraction),
            codec_down=self.codec_down,
            batch_size=tr.batch_size,
            local_steps=tr.local_steps,
            optimizer=pb.OptimizerConfig(
                lr=tr.optim.lr,
                beta1=tr.optim.betas[0],
                beta2=tr.optim.betas[1],
                eps=tr.optim.eps,
                weight_decay=tr.optim.weight_decay,
            ),
            seed=cfg.seed,
            max_seq_len=cfg.data.max_seq_len,
            shard=shard,
            training_mode=tr.edge_mode,
            lora_rank=cfg.lora.r,
            num_rounds=cfg.rounds.num_rounds,
            packed_steps=tr.packed,
            codec_adapter_up=pb.CodecSpec(codec=adapter_up),
            codec_adapter_down=pb.CodecSpec(codec=s.wire.adapter_down),
            error_feedback=list(tr.error_feedback),
            codec_policy=self.codec_policy.to_proto(),
        )
        return pb.JoinReply(
            client_id=s.client_id,
            session_token=s.token,
            run_id=self.app.run_id,
            config=run,
            manifest_json=self.app.manifest.to_json(indent=None),
            bundle_hash=self.app.bundle_hash,
            current_round=current,
            resume_secret=resume,
            limits=self.limits_message(),
        )

    def GetBundle(self, request, context):
        with self._track("GetBundle", context) as call:
            yield from self._get_bundle(request, context, call)

    def _get_bundle(self, request, context, call):
        self._session(request.header, context, call)
        if request.bundle_hash and request.bundle_hash != self.app.bundle_hash:
            _abort(context, "NOT_FOUND", f"unknown bundle {request.bundle_hash!r} (current: {self.app.bundle_hash})")
        files = self.app.bundle_files
        wanted = list(request.files) or sorted(files)
        unknown = [f for f in wanted if f not in files]
        if unknown:
            _abort(context, "NOT_FOUND", f"bundle has no files {unknown[:3]}")
        have = set(request.have_sha256)
        send = [f for f in wanted if files[f][1] not in have]
        for i, name in enumerate(send):
            path, sha, size = files[name]
            with open(path, "rb") as fh:
                offset = 0
                while True:
                    data = fh.read(BUNDLE_CHUNK)
                    yield pb.BundleChunk(
                        file_name=name,
                        offset=offset,
                        total_size=size,
                        sha256=sha,
                        data=data,
                        file_index=i,
                        file_count=len(send),
                    )
                    offset += len(data)
                    if offset >= size:
                        break

    def _step_stream(self, request_iterator, context, train: bool, call):
        """Shared loop of Train and Evaluate: frames, then end_step -> result frames + end_step."""
        asm = self._assembler(self.step_bytes)
        s = None
        current = None  # (round, step) of the frames being received
        reply_cls = pb.TrainReply if train else pb.EvalReply
        for req in request_iterator:
            call.busy()
            if s is None:
                s = self._session(req.header, context, call)
            elif req.header.session_token != s.token or req.header.run_id != self.app.run_id:
                _abort(context, "PERMISSION_DENIED", "a stream may not change its session token or run id")
            key = (req.header.round, req.header.step)
            if current is None:
                current = key
            elif key != current:
                _abort(
                    context,
                    "INVALID_ARGUMENT",
                    f"frames of step {key[1]} (round {key[0]}) arrived before step {current[1]} ended",
                )
            which = req.WhichOneof("body")
            if which == "frame":
                if req.frame.name not in STEP_TENSORS:
                    _abort(
                        context,
                        "INVALID_ARGUMENT",
                        f"unexpected tensor {req.frame.name[:64]!r} in a step (expected {sorted(STEP_TENSORS)})",
                    )
                self._add_frame(asm, req.frame, context)
                call.idle()
                continue
            if which != "end_step":
                _abort(context, "INVALID_ARGUMENT", "message has neither a frame nor end_step")
            tensors = self._finish(asm, context)
            if train:
                codec_down = self._step_codec_down(req.end_step.codec_down, context)  # checked before training
                res = self._guard(context, self.app.train_step, s, req.header.round, req.header.step, tensors)
            else:
                res = self._guard(context, self.app.eval_step, s, tensors)
            header = pb.Header(run_id=self.app.run_id, round=req.header.round, step=req.header.step)
            if train:  # packed like the step's "h" when the step came packed
                for frame in self._grad_frames(s, res, tensors.get(ROW_LENGTHS), codec_down):
                    yield reply_cls(header=header, frame=frame)
            yield reply_cls(
                header=header,
                end_step=pb.StepResult(
                    loss=res.loss,
                    correct=res.correct,
                    count=res.count,
                    metrics={"server_s": res.compute_s, "server_batch": float(res.server_batch)},
                ),
            )
            current = None
            call.idle()
        if s is None:
            _abort(context, "INVALID_ARGUMENT", "empty stream: no message carried a session")
        if asm.in_progress or current is not None:
            log.warning(
                "client %s: stream ended inside step %s; step discarded", s.client_id, current[1] if current else "?"
            )
            _abort(
                context,
                "INVALID_ARGUMENT",
                f"stream ended inside step {current[1] if current else '?'} (no end_step); the step was discarded",
            )

    def Train(self, request_iterator, context):
        with self._track("Train", context, stream=True) as call:
            yield from self._step_stream(request_iterator, context, True, call)

    def Evaluate(self, request_iterator, context):
        with self._track("Evaluate", context, stream=True) as call:
            yield from self._step_stream(request_iterator, context, False, call)

    def PushAdapter(self, request_iterator, context):
        with self._track("PushAdapter", context, stream=True) as call:
            return self._push_adapter(request_iterator, context, call)
        return pb.AdapterReply()  # reached only when the guard closed the call: never sent

    def _push_adapter(self, request_iterator, context, call):
        asm = self._assembler(self.adapter_bytes)
        s, header = None, None
        names = set(self.app.manifest.factor_names)
        for req in request_iterator:
            call.busy()
            if s is None:
                s, header = self._session(req.header, context, call), req.header
            elif req.header.session_token != s.token or req.header.run_id != header.run_id:
                _abort(context, "PERMISSION_DENIED", "a stream may not change its session token or run id")
            elif req.header.round != header.round:
                _abort(context, "INVALID_ARGUMENT", "the round must not change within PushAdapter")
            which = req.WhichOneof("body")
            if which == "frame":
                if req.frame.name not in names:
                    _abort(context, "INVALID_ARGUMENT", f"unknown factor {req.frame.name[:200]!r}")
                if req.frame.codec not in self.factor_codecs:
                    _abort(
                        context,
                        "INVALID_ARGUMENT",
                        f"factors travel as {list(self.factor_codecs)} in this run, not {req.frame.codec[:16]!r}",
                    )
                self._add_frame(asm, req.frame, context)
                call.idle()
            elif which == "end":
                factors = self._finish(asm, context)
                bad = [k for k, v in factors.items() if v.dtype != np.float32]
                if bad:
                    _abort(context, "INVALID_ARGUMENT", f"factors must be float32: {bad[:3]}")
                reported, expected = self._guard(
                    context,
                    self.app.push_adapter,
                    s,
                    header.round,
                    factors,
                    float(req.end.num_samples),
                    dict(req.end.metrics),
                )
                return pb.AdapterReply(
                    header=pb.Header(run_id=self.app.run_id, round=header.round),
                    accepted=True,
                    clients_reported=reported,
                    clients_expected=expected,
                )
            else:
                _abort(context, "INVALID_ARGUMENT", "message has neither a frame nor end")
        _abort(context, "INVALID_ARGUMENT", "PushAdapter stream ended without `end`")

    def AwaitRound(self, request, context):
        with self._track("AwaitRound", context) as call:
            yield from self._await_round(request, context, call)

    def _await_round(self, request, context, call):
        s = self._session(request.header, context, call)
        min_round = request.header.round if request.no_wait else request.header.round + 1
        a = self._guard(context, self.app.await_round, s, min_round, AWAIT_TIMEOUT_S, context.is_active)
        if a is None:
            if not context.is_active():
                return  # the client went away; its thread is free again
            _abort(context, "DEADLINE_EXCEEDED", "no round selected this client in time")
        header = pb.Header(run_id=self.app.run_id, round=a.round_idx)
        d = a.directive
        if d is not None and d.load_factors:
            for frame in self._factor_frames(s, d):
                yield pb.RoundReply(header=header, factor=frame)
        # strategies that fold residuals into frozen weights (FedEx-LoRA, FLoRA): the running sum of the deltas,
        # sent whenever this client has not seen the current version (idempotent, so missed rounds catch up)
        version = self.app.base_version
        if a.stop is False and version != s.base_version:
            for module, delta in self.app.base_deltas_total.items():
                for frame in encode(module, np.ascontiguousarray(delta, dtype=np.float32), "raw"):
                    yield pb.RoundReply(header=header, base_delta=frame)
        trainable, upload = [], []
        if d is not None:
            kinds = FACTOR_SUFFIXES
            names = self.app.split.edge_factor_names()
            trainable = [k for k in names if any(k.endswith(kinds[t]) for t in d.trainable)]
            upload = list(d.upload_keys)
        s.base_version = version
        yield pb.RoundReply(
            header=header,
            directives=pb.RoundDirectives(
                closed_round=max(a.closed_round, 0),
                next_round=a.round_idx,
                trainable_factors=trainable,
                upload_factors=upload,
                reinit=bool(d.reinit_lora) if d else False,
                rank=d.rank if d else 0,
                stop=a.stop,
                stop_reason=a.stop_reason,
                metrics={k: float(v) for k, v in a.metrics.items() if isinstance(v, (int, float))},
            ),
        )

    def Leave(self, request, context):
        with self._track("Leave", context):
            return self._leave(request, context)

    def _leave(self, request, context):
        s = self._session(request.header, context)
        self.app.leave(s)
        log.info("client %s left: %s", s.client_id, request.reason or "-")
        return pb.LeaveReply(ok=True)


def _with_status(method: str, fn, streaming: bool):
    """`fn` with every escaping exception turned into INTERNAL with a message: gRPC would otherwise answer
    UNKNOWN "Exception iterating responses". A status the handler set (context.abort) is left as it is."""

    def internal(context, e: Exception) -> None:
        if isinstance(e, grpc.RpcError) or context.code() is not None:
            return  # the call has its status already (an abort), or the client went away
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error: {type(e).__name__}: {e}"[:2000])

    if streaming:

        @functools.wraps(fn)
        def wrapped(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as e:  # noqa: BLE001 - the point: no exception leaves without a status
                internal(context, e)
                raise
    else:

        @functools.wraps(fn)
        def wrapped(self, request, context):
            try:
                return fn(self, request, context)
            except Exception as e:  # noqa: BLE001
                internal(context, e)
                raise

    return wrapped


for _m in pb.DESCRIPTOR.services_by_name["SplitWave"].methods:
    setattr(SplitWaveServicer, _m.name, _with_status(_m.name, getattr(SplitWaveServicer, _m.name), _m.server_streaming))


class RunningServer:
    """A started gRPC server with its app; `stop()` is graceful (in-flight calls get a grace period)."""

    def __init__(self, app: SplitServer, server: grpc.Server, port: int, health_servicer, servicer=None):
        self.app, self.server, self.port, self.health = app, server, port, health_servicer
        self.servicer = servicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        """Waiting and training clients get UNAVAILABLE (the run is not over: they retry, and rejoin a restarted
        server); calls still open after `grace` are cancelled."""
        self.health.enter_graceful_shutdown()
        self.app.shutdown()
        self.server.stop(grace).wait()
        if self.servicer is not None:
            self.servicer.guard.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(0.5)


def rpc_threads_needed(num_clients: int, limits=None) -> int:
    """Every registered client's calls at once, plus every stranger's call the guard lets wait, plus spares:
    strangers can never hold the threads registered clients need (server/peers.py)."""
    if limits is None:
        limits = LimitsConfig()
    return limits.max_calls_per_client * num_clients + limits.max_pending_calls + num_clients + SPARE_RPC_THREADS


class BindError(RuntimeError):
    """The server cannot listen on the address it was given; the message names the address and the cause."""


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def probe_bind(host: str, port: int) -> None:
    """Bind (and release) every address `host` resolves to, so that a taken port, a privileged port or a host
    that is not this machine's fails with its cause before anything slow happens (gRPC only says "failed")."""
    where = _grpc_address(host, port)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot listen on {where}: host {host!r} does not resolve ({e.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            # as gRPC does: connections of a server that just exited (TIME_WAIT) must not count as "in use"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    why = (
                        f"port {port} is already in use (another server?); pick another --port, or --port 0 "
                        f"for a free one"
                    )
                elif e.errno == errno.EACCES:
                    why = "permission denied (ports below 1024 need privileges); use a port above 1023"
                elif e.errno == errno.EADDRNOTAVAIL:
                    why = f"{sockaddr[0]} is not an address of this machine (use 0.0.0.0 for all interfaces)"
                else:
                    why = e.strerror or str(e)
                raise BindError(f"cannot listen on {where}: {why}") from None


def bind_server(
    cfg,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Create the gRPC server and hold its port, before the (slow) app is built: `start_server(..., bound=)`.

    The synchronous gRPC server parks one thread per open call (AwaitRound waits for a round that needs other
    clients' calls to close), so the pool is sized for every client's calls at once; calls beyond the pool are
    refused at once with RESOURCE_EXHAUSTED instead of queueing behind parked ones."""
    need = rpc_threads_needed(cfg.num_clients, cfg.server.limits)
    if max_workers is None:
        max_workers = max(cfg.server.max_workers, need)
    elif max_workers < need:
        log.warning(
            "max_workers=%d is below the %d threads %d clients can hold; raising it", max_workers, need, cfg.num_clients
        )
        max_workers = need
    probe_bind(host, port)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        maximum_concurrent_rpcs=max_workers,
    )
    addr = _grpc_address(host, port)
    try:
        bound = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise BindError(f"cannot listen on {addr} (taken meanwhile? run with GRPC_VERBOSITY=debug for gRPC's reason)")
    return server, bound


def start_server(
    app: SplitServer,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
    bound: tuple[grpc.Server, int] | None = None,
) -> RunningServer:
    """Serve `app` on a server from `bind_server` (made here from host/port/credentials when not given)."""
    server, port = bound or bind_server(app.cfg, host, port, max_workers, credentials)
    meter = ByteMeter()
    app.meter = meter
    servicer = SplitWaveServicer(app)

    def key(request, context) -> str:
        """Bytes are counted per client id; a name a Join only claims is not one yet (a stranger sending Joins
        under ever new names must not grow the meter), so a first Join counts under "(joining)"."""
        header = getattr(request, "header", None)
        if header is not None and header.session_token in app.sessions:
            return app.sessions[header.session_token].client_id
        name = getattr(request, "client_name", "")
        return name if name in app.by_client else "(joining)"

    add_metered_servicer_to_server(servicer, server, meter, key)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("splitwave.v1.SplitWave", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(reflection_service_names(reflection.SERVICE_NAME), server)
    server.start()
    log.info("serving on %s (run %s)", _grpc_address(host, port), app.run_id)
    return RunningServer(app, server, port, health_servicer, servicer)


def serve_forever(running: RunningServer, ready_file: Path | None = None) -> None:
    """Block until SIGTERM/SIGINT (graceful stop) or until training is over and clients have left."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready_file is not None:
        tmp = Path(str(ready_file) + ".tmp")
        tmp.write_text(json.dumps({"port": running.port, "run_id": running.app.run_id}))
        tmp.rename(ready_file)
    while not stop.wait(0.2):
        if running.app.rounds.stopped and not running.app.has_clients:
            log.info("all rounds done and every client left: stopping")
            break
    running.stop(grace=2.0)
