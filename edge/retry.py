"""One retry policy for every call of the edge client.

What can heal (a server restarting or shutting down, a dropped connection, full call slots) is retried with
jittered exponential backoff within a total time, each retry announced with its attempt number and wait.
What cannot (a TLS mismatch, an unknown host, and, before the server was ever reached, anything that stays
broken past a short connect time) fails at once with ONE line naming the address and the likely cause.
Server answers that are not about the connection (INVALID_ARGUMENT, UNAUTHENTICATED, ...) are re-raised
untouched for the caller to handle. What a call cannot heal by itself but a step beside it can (a session the
server lost: rejoin) goes through `recovering`, with a bound on recoveries in a row.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

C = grpc.StatusCode
TRANSPORT = {C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.ABORTED, C.CANCELLED}


class Unreachable(ConnectionError):
    """The server could not be reached (or not with these settings); the message is one line."""


@dataclass
class RetryPolicy:
    connect_s: float = 5.0  # before the server was first reached: a server that starts late, not a wrong address
    total_s: float = 300.0  # after: rides out a server restart (its checkpoint resume) or a link outage
    first_wait_s: float = 0.5
    max_wait_s: float = 10.0


def diagnose(e: grpc.RpcError, target: str, tls: bool, reached: bool) -> tuple[bool | None, str]:
    """(healable, cause): True = retry, False = fail now with `cause`, None = not a transport problem (the
    server answered: the caller decides)."""
    code, details = e.code(), e.details() or ""
    d = details.lower()
    if code == C.RESOURCE_EXHAUSTED and "concurrent rpc limit" in d:
        return True, f"{target} is busy (call slots full)"
    if code not in TRANSPORT:
        return None, f"{target} answered {code.name}: {details}"
    if "handshake" in d or "ssl" in d or "certificate" in d:
        if "wrong_version_number" in d or ("record" in d and "too long" in d):
            cause = f"{target} does not speak TLS (connected with --ca to a plaintext server): drop --ca/--cert/--key"
        elif "certificate_verify_failed" in d or "unable to get local issuer" in d:
            cause = f"the certificate of {target} is not signed by the CA given with --ca"
        elif "peer name" in d or "hostname" in d or "subject" in d:
            cause = f"the certificate of {target} does not name that host: connect by a name or IP in the certificate"
        else:
            cause = f"TLS handshake with {target} failed: {details}"
        return False, cause
    if "failed to connect" in d and "socket closed" in d and not tls:
        # a TLS server drops a plaintext HTTP/2 preface; a restarting server refuses instead
        return (True if reached else False), (
            f"{target} closed the connection during the handshake: it probably expects TLS (give --ca CA.pem)"
        )
    if "errors resolving" in d or "dns" in d or "domain name not found" in d or "name resolution" in d:
        return reached, f"cannot resolve the host of {target}: check the address"
    if "connection refused" in d:
        if reached:
            return True, f"{target} refused the connection (server restarting?)"
        return True, (
            f"nothing is listening at {target} (connection refused): is the server running there? "
            f"(a first start exports the edge bundle before it listens)"
        )
    if code == C.DEADLINE_EXCEEDED and not reached:
        return True, f"no answer from {target}: wrong address, a firewall, or the server is not up"
    if "connection reset" in d or "socket closed" in d or "broken pipe" in d or "goaway" in d:
        return True, f"connection to {target} lost ({code.name}: {details})"
    return True, f"{target}: {code.name}: {details}"


class Retrier:
    """Runs calls under the policy; `reached` flips once the server has answered anything."""

    def __init__(
        self,
        target: str,
        policy: RetryPolicy | None = None,
        tls: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.target, self.policy, self.tls, self._sleep = target, policy or RetryPolicy(), tls, sleep
        self.reached = False
        self.retries = 0  # over the client's lifetime, for the summary

    def call(self, fn: Callable[[float], T], what: str) -> T:
        """`fn(time_left_s)`; the clock starts at the first failure (a long poll that fails after an hour still
        gets its full budget), except before first contact, when it starts now."""
        start = time.monotonic() if not self.reached else None
        wait, attempt = self.policy.first_wait_s, 0
        while True:
            attempt += 1
            budget = self.policy.total_s if self.reached else self.policy.connect_s
            left = budget if start is None else budget - (time.monotonic() - start)
            try:
                out = fn(max(left, 1.0))
                self.reached = True
                return out
            except grpc.RpcError as e:
                healable, cause = diagnose(e, self.target, self.tls, self.reached)
                if healable is None:
                    self.reached = True
                    raise
                if e.code() == C.RESOURCE_EXHAUSTED:  # the server answered (busy): the connection is fine
                    self.reached = True
                now = time.monotonic()
                start = now if start is None else start
                elapsed = now - start
                if not healable:
                    raise Unreachable(f"{what}: {cause}") from None
                pause = min(wait * (0.5 + random.random()), self.policy.max_wait_s)
                budget = self.policy.total_s if self.reached else self.policy.connect_s
                if elapsed + pause > budget:
                    raise Unreachable(
                        f"{what}: {cause} (gave up after {attempt} attempts in {elapsed:.0f} s; "
                        f"{'--connect-timeout' if not self.reached else '--retry-for'} "
                        f"{budget:g} s)"
                    ) from None
                log.warning(
                    "%s: %s; attempt %d failed, retrying in %.1f s (gives up after %g s)",
                    what,
                    cause,
                    attempt,
                    pause,
                    budget,
                )
                self.retries += 1
                self._sleep(pause)
                wait = min(wait * 2, self.policy.max_wait_s)


def recovering(fn: Callable[[], T], error: type[E], recover: Callable[[E], None], limit: int) -> T:
    """`fn()`; after a failure with `error`, `recover(e)` and `fn()` again, at most `limit` recoveries in a row
    (the failure after that is raised). An exception from `recover` ends it at once."""
    recoveries = 0
    while True:
        try:
            return fn()
        except error as e:
            if recoveries >= limit:
                raise
            recoveries += 1
            recover(e)
