"""Launch real `splitwave server` / `splitwave edge` processes (tests, benchmarks) and always clean them up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # the repository root
CLI = [sys.executable, "-m", "splitwave.cli"]


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextmanager
def server_process(config: Path, run_dir: Path, timeout: float = 300.0, extra: list[str] | None = None):
    """Yield (process, port) of a server that has written its ready file; kill it on exit."""
    ready = run_dir / "ready.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "server.log", "w")
    proc = subprocess.Popen(
        [
            *CLI,
            "server",
            str(config),
            "--run-dir",
            str(run_dir),
            "--ready-file",
            str(ready),
            "--cache-dir",
            str(ROOT / ".cache/bundles"),
            *(extra or []),
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}: {(run_dir / 'server.log').read_text()[-3000:]}"
                )
            if time.monotonic() > end:
                raise TimeoutError("server did not become ready")
            time.sleep(0.2)
        yield proc, json.loads(ready.read_text())["port"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def start_edge(port: int, name: str, cache: Path, log_dir: Path, extra: list[str] | None = None) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen(
        [
            *CLI,
            "edge",
            "--server",
            f"127.0.0.1:{port}",
            "--name",
            name,
            "--cache-dir",
            str(cache),
            "--metrics",
            str(log_dir / f"{name}.jsonl"),
            *(extra or []),
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_all(procs: list[subprocess.Popen], timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(1.0, end - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"edge processes failed with {bad}")
