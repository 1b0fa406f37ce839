"""Start `splitwave server` / `splitwave edge` processes and always end them: the one launcher of
`splitwave simulate` (`splitwave.runner`), the tests and the benchmarks.

A `ProcessGroup` holds the children of one run. Each child runs in a session (process group) of its own
with its output in a log file, and dies with the thread that started it (PR_SET_PDEATHSIG, Linux) even if
this process is killed outright; `stop()` ends every child and the children it started (TERM, then KILL).
A server says that it serves by writing its ready file ({port, run_id}): `wait_ready` waits for that, and
every wait is bounded and names the child's log when the child exits first.

    with ProcessGroup() as procs:
        procs.start_server(config, run_dir=run, cache_dir=bundles, ready_file=run / "ready.json", log=run / "server.log")
        port = procs.wait_ready("server", run / "ready.json", timeout=300)
        procs.start_edge("e0", f"127.0.0.1:{port}", cache_dir=edge_cache, metrics=out / "e0.jsonl", log=out / "e0.log")
        procs.wait_exit(["e0"], timeout=300)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

#: `splitwave` of this interpreter (the CLI module, so no console script needs to be on PATH)
CLI: list[str] = [sys.executable, "-m", "splitwave.cli"]

PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the child: a forked child of a threaded process should not load libraries
    _PRCTL: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


class LaunchError(RuntimeError):
    """A child that exited, or ran out of time, before what it was waited for: the message names its log."""


def child_env(omp_threads: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child, plus unbuffered output (its log is current when read) and the
    Hugging Face hub offline (models come from the local cache), plus `extra`. `omp_threads` sets
    OMP_NUM_THREADS where this environment does not (tests and benchmarks on a small shared host use 1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}
    if omp_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(omp_threads))
    return env


def server_argv(
    config: str | os.PathLike,
    *,
    run_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    ready_file: str | os.PathLike | None = None,
    extra: Sequence[str] = (),
    quiet: bool = False,
) -> list[str]:
    """`splitwave [-q] server CONFIG --run-dir RUN --cache-dir CACHE [--ready-file READY] EXTRA...`."""
    argv = [*CLI, *(["-q"] if quiet else []), "server", str(config), "--run-dir", str(run_dir)]
    argv += ["--cache-dir", str(cache_dir)]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    return argv + list(extra)


def edge_argv(
    name: str,
    server: str,
    *,
    cache_dir: str | os.PathLike,
    metrics: str | os.PathLike | None = None,
    extra: Sequence[str] = (),
    quiet: bool = False,
) -> list[str]:
    """`splitwave [-q] edge --server HOST:PORT --name NAME --cache-dir CACHE [--metrics FILE] EXTRA...`."""
    argv = [*CLI, *(["-q"] if quiet else []), "edge", "--server", server, "--name", name, "--cache-dir", str(cache_dir)]
    if metrics is not None:
        argv += ["--metrics", str(metrics)]
    return argv + list(extra)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessGroup:
    """The children of one run, by name; `stop()` (also on leaving a `with` block) ends them all.

    `cwd` and `env` are the defaults of every `start` (None: this process's)."""

    def __init__(self, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None):
        self.cwd, self.env = cwd, dict(env) if env is not None else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._started: list[subprocess.Popen] = []  # every child, also one whose name was reused by a restart

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, name: str) -> subprocess.Popen:
        return self.procs[name]

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | os.PathLike | None = None,
        append: bool = False,
    ) -> subprocess.Popen:
        """Start `argv` as child `name`, stdout and stderr to `log_path` (appended to with `append`, as a
        restarted process that continues a log)."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = env if env is not None else self.env
        with open(log_path, "ab" if append else "wb") as fh:  # the child has its own copy of the descriptor
            p = subprocess.Popen(
                list(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=dict(env) if env is not None else None,
                cwd=cwd if cwd is not None else self.cwd,
            )
        self.procs[name], self.logs[name] = p, log_path
        self._started.append(p)
        return p

    def start_server(
        self,
        config: str | os.PathLike,
        *,
        run_dir: str | os.PathLike,
        cache_dir: str | os.PathLike,
        log: str | os.PathLike,
        ready_file: str | os.PathLike | None = None,
        extra: Sequence[str] = (),
        quiet: bool = False,
        name: str = "server",
        append: bool = False,
    ) -> subprocess.Popen:
        """Start `splitwave server` (see `server_argv`) as child `name`; `wait_ready` waits for it to serve."""
        argv = server_argv(
            config, run_dir=run_dir, cache_dir=cache_dir, ready_file=ready_file, extra=extra, quiet=quiet
        )
        return self.start(name, argv, log, append=append)

    def start_edge(
        self,
        name: str,
        server: str,
        *,
        cache_dir: str | os.PathLike,
        log: str | os.PathLike,
        metrics: str | os.PathLike | None = None,
        extra: Sequence[str] = (),
        quiet: bool = False,
        append: bool = False,
    ) -> subprocess.Popen:
        """Start `splitwave edge --name NAME` (see `edge_argv`) against `server` (HOST:PORT) as child `name`."""
        argv = edge_argv(name, server, cache_dir=cache_dir, metrics=metrics, extra=extra, quiet=quiet)
        return self.start(name, argv, log, append=append)

    def tail(self, name: str, n: int = 2000) -> str:
        """The last `n` bytes of the child's log (what to show when it failed)."""
        try:
            return self.logs[name].read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def wait_until(self, name: str, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `pred` while child `name` runs; LaunchError if the child exits first or `timeout` s pass.
        `what` says what the child should be doing once `pred` holds, e.g. "serving"."""
        p, end = self.procs[name], time.monotonic() + timeout
        while not pred():
            if p.poll() is not None:
                raise LaunchError(
                    f"{name} exited with code {p.returncode} before {what}; log {self.logs[name]}:\n{self.tail(name)}"
                )
            if time.monotonic() > end:
                raise LaunchError(f"{name} not {what} after {timeout:.0f} s; log {self.logs[name]}")
            time.sleep(0.1)

    def wait_ready(self, name: str, ready_file: str | os.PathLike, timeout: float) -> int:
        """Wait for server `name` to write `ready_file`; its port."""
        ready = Path(ready_file)
        self.wait_until(name, ready.exists, timeout, "serving")
        return int(json.loads(ready.read_text())["port"])

    def wait_exit(self, names: Iterable[str], timeout: float) -> None:
        """Wait for these children to exit, all within `timeout` s; LaunchError naming the first one that
        failed (exit code not 0) or still runs (it is left running: `stop` ends it)."""
        end = time.monotonic() + timeout
        for name in names:
            try:
                rc = self.procs[name].wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise LaunchError(
                    f"{name} still running after {timeout:.0f} s; log {self.logs[name]}:\n{self.tail(name)}"
                ) from None
            if rc != 0:
                raise LaunchError(f"{name} exited with code {rc}; log {self.logs[name]}:\n{self.tail(name)}")

    def stop(self, grace_s: float = 5.0) -> None:
        """End every child still running and its own children: SIGTERM to its process group, SIGKILL to the
        groups still there after `grace_s`."""
        alive = [p for p in self._started if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # the group is the child's own (start_new_session)
        end = time.monotonic() + grace_s
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, end - time.monotonic()))
        for p in self._started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
