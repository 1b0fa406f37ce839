"""A simulated client is state, not a process: what an edge keeps between two of its rounds, plus the edge's
side of the protocol (the messages it sends, how it applies a round's directives).

Torch-free (it runs in executor processes too). The protocol side mirrors `splitwave.edge.client.EdgeClient`
message for message (`push_adapter`, `await_round`; a step's framing is the edge's own,
`splitwave.protos.steps`), so the bytes the engine puts on a link are the exact serialized sizes a real edge
would send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from splitwave.common.manifest import BundleManifest
from splitwave.edge.client import fresh_lora
from splitwave.edge.ranks import RankAdapter
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import CODECS, Assembler, encode
from splitwave.protos.feedback import ErrorFeedback
from splitwave.protos.steps import Step

CAPABILITIES = pb.Capabilities(
    protocol_version=1, backend="onnxruntime", codecs=list(CODECS), training_modes=["recompute", "saved"]
)


@dataclass(slots=True)
class EdgeState:
    """What an edge runtime holds for one client: LoRA factors, AdamW moments, which factors train, and the
    ranks of a heterogeneous-rank client. `factors` None: the bundle's initial factors (never trained)."""

    factors: dict[str, np.ndarray] | None = None
    moments: dict[str, dict] = field(default_factory=dict)  # AdamW.state: name -> {step, exp_avg, exp_avg_sq}
    trainable: frozenset[str] | None = None  # None: every factor
    ranks: dict[str, int] = field(default_factory=dict)  # RankAdapter.ranks
    base_version: int = 0  # version of the folded base-weight deltas this client's graphs use

    def nbytes(self) -> int:
        """Bytes of array data held (what an idle client costs beyond a few small Python objects)."""
        n = sum(a.nbytes for a in (self.factors or {}).values())
        return n + sum(m["exp_avg"].nbytes + m["exp_avg_sq"].nbytes for m in self.moments.values())


@dataclass(slots=True)
class ClientState:
    """One virtual client: its identity on the server (session of its Join), its shard, and its edge state."""

    index: int
    name: str
    token: str = ""
    shard_index: int = 0
    num_samples: int = 0
    last_round: int = -1  # the last round it was assigned (the round its AwaitRound header names)
    edge: EdgeState = field(default_factory=EdgeState)
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)  # the edge's "up"/"adapter_up" residuals

    def header(self, run_id: str, round_idx: int = 0, step: int = 0) -> pb.Header:
        return pb.Header(session_token=self.token, run_id=run_id, round=round_idx, step=step)


def join_request(name: str) -> pb.JoinRequest:
    return pb.JoinRequest(client_name=name, capabilities=CAPABILITIES)


def await_request(c: ClientState, run_id: str) -> pb.RoundRequest:
    """The AwaitRound an edge sends: first `no_wait` for the round it joined in, then for the round after."""
    if c.last_round < 0:
        return pb.RoundRequest(header=c.header(run_id, 0), no_wait=True)
    return pb.RoundRequest(header=c.header(run_id, c.last_round), no_wait=False)


def frame_codec(msgs: list, name: str) -> str | None:
    """The codec the first frame of tensor `name` in a step's messages (or replies) travelled in."""
    for m in msgs:
        if m.WhichOneof("body") == "frame" and m.frame.name == name:
            return m.frame.codec or "raw"
    return None


Encoder = Callable[..., list]  # splitwave.protos.codec.encode, or an ErrorFeedback's encode


def step_reply(replies: list, sent: Step) -> tuple[np.ndarray, pb.StepResult]:
    """grad_h (decoded and, for a packed step, unpacked as the edge does) and the StepResult of the replies
    to the step `sent` (the edge's framing, `splitwave.protos.steps.build_step`)."""
    asm = Assembler()
    for r in replies:
        if r.WhichOneof("body") == "frame":
            asm.add(r.frame)
        else:
            return sent.grad_h(asm.finish()), r.end_step
    raise RuntimeError("Train replies without end_step")


def push_messages(
    header: pb.Header,
    edge: EdgeState,
    keys: list[str],
    ranks: RankAdapter,
    codec: str | pb.CodecSpec,
    num_samples: int,
    stats: dict,
    encoder: Encoder = encode,
) -> list:
    """A PushAdapter's request messages (EdgeClient.push_adapter): the upload keys at the client's own rank, in
    the adapter codec (`adapter_codec_up` of the JoinReply's RunConfig)."""
    msgs = [
        pb.AdapterRequest(header=header, frame=f)
        for k in keys
        for f in encoder(k, ranks.from_graph(k, edge.factors[k]), codec)
    ]
    msgs.append(
        pb.AdapterRequest(
            header=header,
            end=pb.AdapterEnd(
                num_samples=num_samples,
                local_steps=stats.get("steps", 0),
                metrics={k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
            ),
        )
    )
    return msgs


@dataclass
class Assignment:
    """A round's AwaitRound reply as the edge reads it."""

    directives: pb.RoundDirectives
    factors: dict[str, np.ndarray]
    deltas: dict[str, np.ndarray]


def read_assignment(replies: list) -> Assignment:
    asm, deltas, d = Assembler(), Assembler(), None
    for reply in replies:
        which = reply.WhichOneof("body")
        if which == "factor":
            asm.add(reply.factor)
        elif which == "base_delta":
            deltas.add(reply.base_delta)
        else:
            d = reply.directives
    if d is None:
        raise RuntimeError("AwaitRound ended without directives")
    return Assignment(d, asm.finish(), deltas.finish())


def apply_assignment(
    edge: EdgeState,
    a: Assignment,
    initial: dict[str, np.ndarray],
    shapes: dict[str, tuple],
    ranks: RankAdapter,
    seed: int,
    shard_index: int,
) -> None:
    """What EdgeClient.await_round does to its runtime, done to the client's state: load the round's factors
    (zero-padded to the graph's rank), re-initialise for FLoRA, set the trainable factors. `initial`: the
    bundle's factors (a client that never trained holds them)."""
    d = a.directives
    if edge.factors is None:
        edge.factors = {k: v.copy() for k, v in initial.items()}
    factors = ranks.to_graph(a.factors, shapes)
    if d.reinit:
        fresh = fresh_lora(edge.factors, seed=[seed, shard_index, d.next_round])
        ranks.set_rank([k for k in fresh if k not in factors], d.rank)
        _set(edge, ranks.mask({k: v for k, v in fresh.items() if k not in factors}), shapes)
        edge.moments = {}
    if factors:
        _set(edge, factors, shapes)
    names = set(shapes)
    trainable = set(d.trainable_factors) or names
    edge.trainable = None if trainable == names else frozenset(trainable)
    edge.ranks = dict(ranks.ranks)


def _set(edge: EdgeState, values: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """EdgeRuntime.set_factors on the state: float32 C-contiguous copies of the manifest's shapes."""
    for k, v in values.items():
        a = np.array(v, dtype=np.float32, copy=True, order="C")
        if a.shape != tuple(shapes[k]):
            raise ValueError(f"{k}: shape {a.shape} != manifest {tuple(shapes[k])}")
        edge.factors[k] = a


def rank_adapter(manifest: BundleManifest, ranks: dict[str, int]) -> RankAdapter:
    lora = manifest.lora
    ra = RankAdapter(lora.r, lora.alpha, lora.rslora)
    ra.ranks = dict(ranks)
    return ra
