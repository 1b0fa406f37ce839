"""The README's "Running server and edges on two machines" section, run as written on loopback.

The commands are taken from the README itself (its two ```bash blocks: the server machine's and a device's), so
the recipe cannot drift from what is tested. Only what a test must change is changed, each one checked to be in
the README: the MiniLM config becomes a tiny one (1 round), port 50051 a free port, `--host 0.0.0.0` loopback,
and `splitwave` is `python -m splitwave` of this checkout. The devices run in folders of their own that hold
only the copied `certs/ca.pem` (and, under mTLS, their own key pair), as on a second machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml
from net_helpers import BASE, BUNDLE_CACHE, ROOT, free_port

from splitwave.launch import ProcessGroup, child_env

SECTION = "## Running server and edges on two machines"
README_CONFIG = "configs/sst2-minilm-wireless.yaml"
README_PORT = "50051"
DEVICES = ("phone-1", "phone-2")
# what the section's prose adds for mTLS (checked to be there, whitespace-normalized)
MTLS_CERTS = 'splitwave certs certs --hosts "$SERVER_HOST" localhost 127.0.0.1 --clients phone-1 phone-2'
MTLS_SERVER = "--set server.security.client_ca=certs/ca.pem"
MTLS_EDGE = "--cert certs/phone-1.pem --key certs/phone-1.key"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else None]


def readme_scripts() -> tuple[str, str]:
    """(server machine's script, a device's script), as the README has them."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_section(), re.S)
    assert len(blocks) == 2, "the section should have two bash blocks: the server machine's and a device's"
    server, device = blocks
    assert "splitwave certs" in server and "splitwave server" in server and "splitwave edge" in device
    return server, device


def _flat(text: str) -> str:
    return " ".join(text.split())


def _localize(script: str, config: Path, port: int) -> str:
    assert README_PORT in script, "the README's commands no longer use port 50051"
    script = script.replace(README_CONFIG, str(config)).replace(README_PORT, str(port))
    script = script.replace("--host 0.0.0.0", "--host 127.0.0.1")  # tests stay on loopback
    return re.sub(r"(?m)^splitwave ", f"{shlex.quote(sys.executable)} -m splitwave ", script)


def _env() -> dict[str, str]:
    env = child_env(omp_threads=1)
    env.pop("SPLITWAVE_EDGE_CACHE", None)  # the README's devices use the default cache folder
    return env


def test_readme_has_the_recipe_and_its_mtls_variant():
    server, device = readme_scripts()
    assert README_CONFIG in server and README_PORT in server and f":{README_PORT}" in device
    assert "--name phone-1" in device and "--ca certs/ca.pem" in device
    flat = _flat(readme_section())
    for fragment in (MTLS_CERTS, MTLS_SERVER, MTLS_EDGE, "--name phone-2"):
        assert fragment in flat, fragment


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_two_machine_recipe_runs_as_written(tmp_path, mtls):
    server_script, device_script = readme_scripts()
    if mtls:  # the prose's additions, applied where it says
        plain_certs = next(line for line in server_script.splitlines() if line.startswith("splitwave certs"))
        server_script = server_script.replace(plain_certs, MTLS_CERTS)
        server_script = server_script.rstrip("\n") + f" {MTLS_SERVER}\n"
        device_script = device_script.rstrip("\n") + f" {MTLS_EDGE}\n"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({**BASE, "name": "recipe", "rounds": {"num_rounds": 1, "deadline_s": 120}}))
    port = free_port()
    machine = tmp_path / "server-machine"
    (machine / ".cache").mkdir(parents=True)
    cache = Path(os.environ.get("SPLITWAVE_TEST_CACHE", BUNDLE_CACHE))
    cache.mkdir(parents=True, exist_ok=True)
    (machine / ".cache" / "bundles").symlink_to(cache, target_is_directory=True)  # exported once for all tests

    slog = tmp_path / "server.log"
    with ProcessGroup(env=_env()) as procs:  # each script runs in a bash of its own, in its machine's folder
        server = procs.start("server", ["bash", "-euc", _localize(server_script, config, port)], slog, cwd=machine)
        procs.wait_until("server", lambda: "listening on" in slog.read_text(errors="replace"), 600, "listening")
        certs = machine / "certs"
        for f in ("ca.key", "server.key"):
            assert stat.S_IMODE((certs / f).stat().st_mode) == 0o600, f

        edges, logs = [], []
        for name in DEVICES:
            device = tmp_path / name  # a second machine: only what the README says to copy
            (device / "certs").mkdir(parents=True)
            shutil.copy(certs / "ca.pem", device / "certs" / "ca.pem")
            if mtls:
                for ext in ("pem", "key"):
                    shutil.copy(certs / f"{name}.{ext}", device / "certs" / f"{name}.{ext}")
            script = _localize(device_script, config, port).replace("phone-1", name)
            logs.append(tmp_path / f"{name}.log")
            edges.append(procs.start(name, ["bash", "-euc", script], logs[-1], cwd=device))
        for e, log in zip(edges, logs):
            assert e.wait(600) == 0, log.read_text()[-4000:]
        assert server.wait(120) == 0, slog.read_text()[-4000:]

    out = slog.read_text()
    run_dirs = sorted((machine / "runs" / "recipe").iterdir())
    assert len(run_dirs) == 1 and re.fullmatch(r"\d{8}-\d{6}(-\d+)?", run_dirs[0].name)
    assert f"run folder {Path('runs') / 'recipe' / run_dirs[0].name}" in out
    assert ("mTLS" if mtls else "(TLS") in out
    assert "finished 1 of 1 rounds" in out and "accuracy" in out and "loss" in out, out[-3000:]
    assert "results in runs/recipe/" in out
    rounds = [json.loads(x) for x in (run_dirs[0] / "server_metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and sorted(rounds[0]["reported"]) == list(DEVICES)
    assert "eval_accuracy" in rounds[0]
    assert "Traceback" not in out
