"""Who is in the run: admitting a client (authentication and authorization at Join), its session, rejoins
under the same name, freeing the slot of a client that never trains, and the clients a restarted server
expects back.

Its own module because membership is the server's security boundary: every rule about which caller may act
as which client lives here, apart from training and rounds. The table persists through a callback (the
checkpoint's client registry) and knows nothing of rounds but what it is told.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitwave.common.config import ExperimentConfig
from splitwave.protos.feedback import ErrorFeedback
from splitwave.server.checkpoint import token_digest
from splitwave.server.errors import ServiceError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ClientWire:
    """What the server encodes for one client beyond the run's codecs: the adapter codec negotiated at its Join
    ("raw" for a session restored from a checkpoint: its capabilities are not kept), the error-feedback
    residuals of "down" and "adapter_down", and the frames last sent with them, so that a retried call gets
    the same bytes and a residual moves once. A new session (a rejoin) starts with none of it."""

    adapter_down: str = "raw"
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    last_grad: tuple | None = None  # (StepResult, frames)
    last_factors: tuple | None = None  # (ClientDirective, frames)


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
    wire: ClientWire = field(default_factory=ClientWire)
    lock: threading.Lock = field(default_factory=threading.Lock)


def check_join(
    cfg: ExperimentConfig,
    client_name: str,
    enrollment_secret: str,
    codecs: list[str],
    training_modes: list[str],
    protocol_version: int,
    identity: str = "",
    identity_names: tuple[str, ...] = (),
) -> str:
    """What a Join must satisfy before it may take a slot; returns the client name it claims ("": anonymous).
    `identity` is the peer's client-certificate identity under mTLS and `identity_names` every name of that
    certificate (CN, SANs): the client name must be one of them."""
    sec = cfg.server.security
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
    if sec.enrollment_secret and not secrets.compare_digest(enrollment_secret.encode(), sec.enrollment_secret.encode()):
        raise ServiceError("UNAUTHENTICATED", "wrong enrollment secret")
    if sec.allow_list is not None and client_name not in sec.allow_list:
        raise ServiceError("PERMISSION_DENIED", f"client {client_name!r} is not on the allow list")
    tr = cfg.training
    need = {c for c in (tr.codec_up, tr.codec_down) if c != "raw"}
    if codecs and not need <= set(codecs):
        raise ServiceError("FAILED_PRECONDITION", f"client lacks codecs {sorted(need - set(codecs))}")
    if training_modes and tr.edge_mode not in training_modes:
        raise ServiceError("FAILED_PRECONDITION", f"client cannot train in mode {tr.edge_mode!r}")
    return client_name


class SessionTable:
    """Sessions by token and by client name, plus the sessions of clients not yet back after a restart (by the
    digest of their token). One slot (data shard) per client. `persist(registry)` is called, under the table's
    lock, whenever membership changes (None: nothing is persisted)."""

    def __init__(
        self,
        shard_sizes: list[int],
        unused_slot_s: float,
        persist: Callable[[dict], None] | None = None,
    ):
        self.shard_sizes = shard_sizes
        self.unused_slot_s = unused_slot_s
        self.persist = persist
        self.sessions: dict[str, Session] = {}
        self.by_client: dict[str, Session] = {}
        self.restored: dict[str, Session] = {}  # token digest -> session of a client not yet back after a restart
        self.lock = threading.Lock()

    def restore(self, clients: dict[str, dict]) -> None:
        """The clients of a checkpoint's registry: expected back with their tokens, on their shards."""
        for cid, c in clients.items():
            s = Session(
                cid,
                "",
                int(c["shard"]),
                self.shard_sizes[int(c["shard"])],
                time.time(),
                identity=c.get("identity", ""),
                resumed=True,
                resume_digest=c.get("resume_sha256", ""),
                trained=bool(c.get("trained", True)),
            )
            self.restored[c["token_sha256"]] = s
            self.by_client[cid] = s

    def registry(self) -> dict[str, dict]:
        """What a checkpoint keeps of every client (only digests of its secrets)."""
        clients = {}
        for s in self.by_client.values():
            digest = token_digest(s.token) if s.token else next(d for d, r in self.restored.items() if r is s)
            clients[s.client_id] = {
                "token_sha256": digest,
                "shard": s.shard_index,
                "identity": s.identity,
                "resume_sha256": s.resume_digest,
                "trained": s.trained,
            }
        return clients

    def save(self) -> None:
        """(lock held) Persist the registry, if the table persists."""
        if self.persist is not None:
            self.persist(self.registry())

    def admit(
        self,
        client_name: str,
        identity: str,
        resume_secret: str,
        selected_since: Callable[[str], float | None],
    ) -> tuple[Session, Session | None, list[Session], str]:
        """A session for a checked Join: (new session, the session it replaces on a rejoin, sessions evicted to
        free a slot, resume secret). Without a certificate, a rejoin under a name that has a session must present
        that session's resume secret (the enrollment secret proves membership, not identity)."""
        evicted: list[Session] = []
        with self.lock:
            # an anonymous client gets a fresh name: never one that would take over another client's session
            name = client_name or next(
                f"edge-{i}" for i in range(len(self.by_client) + 1) if f"edge-{i}" not in self.by_client
            )
            old = self.by_client.get(name)
            if old is not None:  # a rejoin after a crash: new token, same shard
                self._check_rejoin(old, identity, resume_secret)
                self.sessions.pop(old.token, None)
                self.restored = {d: r for d, r in self.restored.items() if r is not old}
                shard = old.shard_index
                secret = resume_secret or secrets.token_urlsafe(32)  # mTLS rejoins may come without one
            else:
                shard, evicted = self._free_slot(selected_since)
                secret = secrets.token_urlsafe(32)
            s = Session(
                name,
                secrets.token_urlsafe(32),
                shard,
                self.shard_sizes[shard],
                time.time(),
                identity=identity,
                resumed=old is not None and old.resumed,
                resume_digest=token_digest(secret),
                trained=old is not None and old.trained,
            )
            self.sessions[s.token] = s
            self.by_client[name] = s
            self.save()
        return s, old, evicted, secret

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

    @staticmethod
    def _unused_since(s: Session, now: float, selected_since: Callable[[str], float | None]) -> float:
        """Seconds a client has held a slot without training while a round wanted it (0: not unused)."""
        if s.trained:
            return 0.0
        since = selected_since(s.client_id)
        if since is None:
            return 0.0
        return min(now - s.joined_at, time.monotonic() - since)

    def _free_slot(self, selected_since: Callable[[str], float | None]) -> tuple[int, list[Session]]:
        """A shard nobody holds; else the slot of the client that has held one longest without ever training
        while selected (after `server.limits.unused_slot_s`). Called with the lock held."""
        used = {s.shard_index for s in self.by_client.values()}
        free = [i for i in range(len(self.shard_sizes)) if i not in used]
        if free:
            return free[0], []
        limit = self.unused_slot_s
        now = time.time()
        idle = sorted(
            ((self._unused_since(s, now, selected_since), s) for s in self.by_client.values() if not s.trained),
            key=lambda x: -x[0],
        )
        if idle and idle[0][0] >= limit:
            victim = idle[0][1]
            log.warning("client %s held a slot for %.0f s without training: slot freed", victim.client_id, idle[0][0])
            self.sessions.pop(victim.token, None)
            self.by_client.pop(victim.client_id, None)
            self.restored = {d: r for d, r in self.restored.items() if r is not victim}
            return victim.shard_index, [victim]
        if idle:
            raise ServiceError(
                "UNAVAILABLE",
                f"all {len(self.shard_sizes)} client slots are taken; slots of clients that "
                f"do not train are freed after {limit:g} s: retry later",
            )
        raise ServiceError("RESOURCE_EXHAUSTED", f"all {len(self.shard_sizes)} client slots are taken")

    def lookup(self, token: str, run_id: str, this_run: str, identity: str | tuple[str, ...] = "") -> Session:
        """The session of `token`; checks the run id against `this_run` and, under mTLS, that the same
        certificate presents it (`identity`: the certificate's name, or all of its names)."""
        names = (identity,) if isinstance(identity, str) else tuple(identity)
        s = self.sessions.get(token) if token else None
        if s is None and token and self.restored:  # first call of a client after a server restart
            with self.lock:
                s = self.restored.pop(token_digest(token), None)
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
        if run_id != this_run:
            raise ServiceError("FAILED_PRECONDITION", f"run id {run_id!r} is not this run ({this_run})")
        return s

    def remove(self, s: Session) -> bool:
        """End session `s`; True if it was its client's current one (a stale session of a client that rejoined
        since leaves the client in the run)."""
        with self.lock:
            self.sessions.pop(s.token, None)
            current = self.by_client.get(s.client_id) is s
            if current:
                self.by_client.pop(s.client_id, None)
                self.save()
        return current

    def mark_trained(self, s: Session) -> None:
        """`s` trained its first step: its slot is no longer one that may be freed."""
        s.trained = True
        if self.persist is not None:
            with self.lock:
                self.save()
