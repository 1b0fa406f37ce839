"""Executors of the edge math: a few ORT sessions that many virtual clients take turns on.

An `EdgeWorker` holds ONE `EdgeRuntime` (the bundle's forward and backward sessions, intra-op threads 1, so
its arithmetic does not depend on where it runs) and the state of the clients in flight on it; before each
call it swaps that client's factors, AdamW moments and trainable set in. Recompute mode keeps only the step's
inputs between a client's forward and its backward, saved mode its saved activations.

A pool runs workers and returns handles: the engine submits edge work as soon as its inputs exist (a
client's backward and next forward with its grad_h) and waits for the result only when the event that needs
it is processed, so the edge work of different clients runs in parallel with each other and with the server. Results never feed back into *when* anything
happens on the virtual clock, so the pool (and its size, and which worker ran what) cannot change a result.
A worker process takes calls off its socket on a reader thread as they come, so the engine never waits to
send (before, a 1 MB grad_h waited in the socket for the worker's previous call to end: 1.8 s of a 9.5 s round).

* `InlinePool`: one worker in this process (no parallelism, no extra memory);
* `ProcessPool`: `sim.workers` spawned processes, one worker each (`local` executor);
* `RayPool`: Ray actors, one worker each (`ray` executor), on this machine or a cluster (`sim.ray_address`).

Torch-free: worker processes import only numpy, onnxruntime and the protocol code.
"""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
import traceback
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from splitwave.common.factors import load_factors
from splitwave.common.manifest import BundleManifest
from splitwave.edge.runtime import EdgeRuntime
from splitwave.sim.clients import EdgeState, rank_adapter

log = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
    """Edge work failed in an executor; the message carries the worker's traceback."""


class EdgeWorker:
    """One ORT runtime of the bundle, shared by the clients in flight on it (their state swapped in per call)."""

    def __init__(self, bundle_dir: str, mode: str, optim: dict, threads: int = 1):
        self.rt = EdgeRuntime(bundle_dir, mode=mode, threads=threads, **optim)
        self.initial = {k: v.copy() for k, v in self.rt.factors.items()}
        self.names = set(self.rt.factor_names)
        self.clients: dict[int, list] = {}  # client index -> [EdgeState, pending of its last forward]
        self.deltas: dict[int, dict] = {0: {}}  # base-weight version -> running sum of deltas (0: the bundle's)
        self.version = 0

    def begin(self, cid: int, state: EdgeState, deltas: dict | None = None) -> None:
        """Client `cid` starts a round on this worker; `deltas`: its base-weight version's deltas, if new here."""
        if deltas is not None:
            self.deltas[state.base_version] = deltas
        if state.factors is None:
            state.factors = {k: v.copy() for k, v in self.initial.items()}
        else:  # arrays that came through Ray's object store are read-only views: the optimizer updates in place
            state.factors = {k: v if v.flags.writeable else v.copy() for k, v in state.factors.items()}
            state.moments = {
                k: {n: (a if not isinstance(a, np.ndarray) or a.flags.writeable else a.copy()) for n, a in m.items()}
                for k, m in state.moments.items()
            }
        self.clients[cid] = [state, None]

    def _load(self, cid: int) -> EdgeState:
        state = self.clients[cid][0]
        if state.base_version != self.version:  # graphs rebuilt with that version's frozen weights
            self.rt.set_base_deltas(self.deltas[state.base_version])
            self.version = state.base_version
        self.rt.factors = state.factors  # updated in place by the optimizer: the state is the runtime's
        self.rt.optimizer.state = state.moments
        self.rt.trainable = set(state.trainable) if state.trainable is not None else self.names
        return state

    def forward(self, cid: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self._load(cid)
        h = self.rt.forward(ids, mask)
        self.clients[cid][1] = self.rt.take_pending()
        return h

    def backward(self, cid: int, grad_h: np.ndarray) -> None:
        """Backward of the client's last forward and the AdamW step (padded ranks masked, as EdgeClient does)."""
        state = self._load(cid)
        self.rt.put_pending(self.clients[cid][1])
        self.clients[cid][1] = None
        grads = self.rt.backward(grad_h)
        if state.ranks:
            grads = rank_adapter(self.rt.manifest, state.ranks).mask(grads)
        self.rt.step(grads)

    def release(self, cid: int) -> EdgeState:
        """The client's state after its round (back to the engine, which keeps it while the client is idle)."""
        return self.clients.pop(cid)[0]

    def ping(self) -> int:
        return 1


def initial_factors(bundle_dir: Path) -> dict[str, np.ndarray]:
    """The bundle's LoRA factors (what a client that never trained holds)."""

    manifest = BundleManifest.from_file(Path(bundle_dir))
    return load_factors(Path(bundle_dir) / manifest.factors_file)


# ----------------------------------------------------------------------------------------------- pools
class Handle:
    __slots__ = ("worker", "done", "ok", "value")

    def __init__(self, worker: int):
        self.worker, self.done, self.ok, self.value = worker, False, True, None


class InlinePool:
    """One worker in this process; work runs when submitted."""

    name = "inline"

    def __init__(self, worker_args: tuple):
        self.worker = EdgeWorker(*worker_args)
        self.size = 1

    def submit(self, worker: int, op: str, *args) -> Handle:
        h = Handle(0)
        h.value = getattr(self.worker, op)(*args)
        h.done = True
        return h

    def result(self, h: Handle) -> Any:
        return h.value

    def close(self) -> None:
        pass


def _receive(conn, inbox: queue.SimpleQueue) -> None:
    """A worker process's reader thread: takes every call off the socket as soon as it arrives, so the engine's
    send never waits for the worker to finish the call before it (a grad_h is larger than a socket buffer)."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = None
        inbox.put(msg)
        if msg is None:
            return


def _serve(conn, worker_args: tuple) -> None:
    """A worker process: one EdgeWorker, calls in order, one reply per call; exits when the pipe closes."""
    try:
        worker = EdgeWorker(*worker_args)
        conn.send((True, None))
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which fails the run with it
        conn.send((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(conn, inbox), daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            return
        op, args = msg
        try:
            out = (True, getattr(worker, op)(*args))
        except BaseException as e:  # noqa: BLE001
            out = (False, f"{op}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        conn.send(out)


class ProcessPool:
    """`n` worker processes (the `local` executor with `sim.workers` > 0), each `python -m
    splitwave.sim.executors FD` talking over a socket pair: unlike multiprocessing's spawn, nothing re-imports
    the caller's main module, so any script can run the engine. A reader thread per worker drains its
    results, so neither side ever blocks the other on a full socket."""

    name = "local"

    def __init__(self, worker_args: tuple, n: int):
        self.size = n
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        self._pending: list[deque[Handle]] = [deque() for _ in range(n)]
        self._cv = threading.Condition()
        self._send_locks = [threading.Lock() for _ in range(n)]
        for _ in range(n):
            mine, theirs = socket.socketpair()
            p = subprocess.Popen(
                [sys.executable, "-m", "splitwave.sim.executors", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            conn = Connection(mine.detach())
            conn.send(worker_args)
            self._conns.append(conn)
            self._procs.append(p)
        for i, c in enumerate(self._conns):  # every worker up (bundle loaded) before the first event
            try:
                ok, err = c.recv()
            except (EOFError, OSError):
                ok, err = False, f"exited with code {self._procs[i].wait()}"
            if not ok:
                self.close()
                raise ExecutorError(f"edge worker {i} failed to start: {err}")
        self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(n)]
        for t in self._readers:
            t.start()

    def _read(self, i: int) -> None:
        conn = self._conns[i]
        while True:
            try:
                ok, value = conn.recv()
            except (EOFError, OSError):
                ok, value = False, f"edge worker {i} exited"
                with self._cv:
                    while self._pending[i]:
                        h = self._pending[i].popleft()
                        h.ok, h.value, h.done = False, value, True
                    self._cv.notify_all()
                return
            with self._cv:
                h = self._pending[i].popleft()
                h.ok, h.value, h.done = ok, value, True
                self._cv.notify_all()

    def submit(self, worker: int, op: str, *args) -> Handle:
        h = Handle(worker)
        with self._cv:
            self._pending[worker].append(h)
        with self._send_locks[worker]:
            self._conns[worker].send((op, args))
        return h

    def result(self, h: Handle) -> Any:
        with self._cv:
            while not h.done:
                self._cv.wait(1.0)
                if not h.done and self._procs[h.worker].poll() is not None:
                    raise ExecutorError(f"edge worker {h.worker} died (exit code {self._procs[h.worker].returncode})")
        if not h.ok:
            raise ExecutorError(f"edge worker {h.worker}: {h.value}")
        return h.value

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for c in self._conns:
            c.close()


class _RayWorker(EdgeWorker):
    """An EdgeWorker as a Ray actor; `node()` says which node of the cluster it runs on."""

    def node(self) -> str:
        import ray  # loaded already in a Ray actor; only the ray executor gets here

        return ray.get_runtime_context().get_node_id()


class RayPool:
    """`n` Ray actors, one EdgeWorker each (the `ray` executor). Ray runs an actor's calls in submission order.
    `address` None starts Ray on this machine; otherwise the cluster at `address` (every node needs the same
    environment and the bundle at the same path)."""

    name = "ray"

    def __init__(self, worker_args: tuple, n: int, address: str | None = None):
        import ray  # the [ray] extra: imported only when this executor is chosen

        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            self._owns = True
        # one core each, spread over the cluster's nodes
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_RayWorker)
        self.size = n
        self.actors = [actor.remote(*worker_args) for _ in range(n)]
        self.nodes = ray.get([a.node.remote() for a in self.actors])
        log.info("%d edge actors on %d Ray node(s)", n, len(set(self.nodes)))

    def submit(self, worker: int, op: str, *args) -> Handle:
        h = Handle(worker)
        h.value = getattr(self.actors[worker], op).remote(*args)
        return h

    def result(self, h: Handle) -> Any:
        if not h.done:
            try:
                h.value = self._ray.get(h.value)
            except Exception as e:  # noqa: BLE001 - Ray wraps the actor's exception
                raise ExecutorError(f"edge actor {h.worker}: {e}") from None
            h.done = True
        return h.value

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        if self._owns:
            self._ray.shutdown()


def make_pool(
    executor: str, workers: int, bundle_dir: Path, mode: str, optim: dict, ray_address: str | None = None
) -> InlinePool | ProcessPool | RayPool:
    """The configured pool: `local` with 0 workers runs in this process."""
    args = (str(Path(bundle_dir).resolve()), mode, dict(optim), 1)  # absolute: actors may run elsewhere
    if executor == "ray":
        return RayPool(args, max(1, workers), ray_address)
    if workers <= 0:
        return InlinePool(args)
    return ProcessPool(args, workers)


if __name__ == "__main__":  # a ProcessPool worker: its socket's file descriptor is the argument
    _conn = Connection(int(sys.argv[1]))
    _serve(_conn, _conn.recv())
