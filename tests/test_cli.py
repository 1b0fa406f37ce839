"""The command line: one style for every subcommand, clear one-line errors, a server that says what it does."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from net_helpers import BASE, ROOT

from splitwave.cli import _Help, build_parser, main
from splitwave.launch import ProcessGroup, child_env

QUICK = str(ROOT / "configs" / "quick.yaml")
QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


@pytest.fixture
def cli_env(monkeypatch):
    """main() sets env defaults that quiet third-party output: keep them out of the other tests."""
    for name in QUIET_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_flag_has_help_and_shows_its_default(command):
    sp = _subparsers()[command]
    fmt = _Help(command)
    for action in sp._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help text"
        shown = fmt._get_help_string(action)
        if (
            action.option_strings
            and action.default is not argparse.SUPPRESS
            and not action.required
            and "deprecated" not in action.help
        ):
            assert "default" in shown, f"{command} {name}: help does not say the default: {shown!r}"


def test_every_config_command_takes_the_config_the_same_way():
    subs = _subparsers()
    for command in ("export", "server", "simulate", "plan"):
        positional = [a for a in subs[command]._actions if not a.option_strings and a.dest == "config"]
        assert positional and positional[0].metavar == "CONFIG", command
        assert any("--set" in a.option_strings for a in subs[command]._actions), command
    port = next(a for a in subs["server"]._actions if "--port" in a.option_strings)
    assert "0 = a free port" in port.help
    # the old spelling still works for scripts that use it
    args = build_parser().parse_args(["server", "--config", "a.yaml"])
    assert args.config is None and args.config_opt == "a.yaml"
    assert build_parser().parse_args(["server", "a.yaml", "-v"]).config == "a.yaml"


def test_set_without_equals_explains_the_form(capsys, cli_env):
    with pytest.raises(SystemExit) as e:
        main(["simulate", QUICK, "--set", "training.batch_size", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "key=value" in err and "--set training.batch_size=8" in err, err


def test_unknown_key_suggests_the_closest(capsys, cli_env):
    assert main(["plan", QUICK, "--set", "training.batchsize=8"]) == 2
    err = capsys.readouterr().err
    assert "did you mean training.batch_size?" in err and "Traceback" not in err, err


def test_server_needs_exactly_one_config(capsys, cli_env):
    assert main(["server"]) == 2
    assert "no config given" in capsys.readouterr().err
    assert main(["server", QUICK, "--config", "other.yaml"]) == 2
    assert "two configs" in capsys.readouterr().err


def test_python_dash_m_splitwave_is_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "splitwave", "--help"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for command in _subparsers():
        assert command in out.stdout


def test_probe_bind_names_the_cause():
    from splitwave.server.service import BindError, probe_bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"127.0.0.1:{port}: port {port} is already in use"):
            probe_bind("127.0.0.1", port)
    with pytest.raises(BindError, match="not an address of this machine"):
        probe_bind("192.0.2.1", 0)  # TEST-NET-1: documentation only, never assigned
    with pytest.raises(BindError, match="does not resolve"):
        probe_bind("no-such-host.invalid", 0)
    probe_bind("127.0.0.1", 0)  # a free port is fine


def test_probe_bind_accepts_the_port_of_a_server_that_just_exited():
    """A restarted server takes its old port back while the old connections linger in TIME_WAIT (gRPC binds
    with SO_REUSEADDR; the probe must not call that port "in use")."""
    from splitwave.server.service import probe_bind

    with socket.socket() as old:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listener
        old.bind(("127.0.0.1", 0))
        old.listen()
        port = old.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = old.accept()
            conn.close()  # the server side closes first: its end of the connection is left in TIME_WAIT
            client.recv(1)
    probe_bind("127.0.0.1", port)


def test_run_dirs_are_timestamped_and_never_shared(tmp_path):
    from splitwave.common.config import parse_config
    from splitwave.runner import make_run_dir

    cfg = parse_config({"name": "x", "output_dir": str(tmp_path)})
    a, b = make_run_dir(cfg), make_run_dir(cfg)
    assert a != b and a.parent == b.parent == tmp_path / "x"
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", a.name)


def _server(procs: ProcessGroup, args: list[str], log: Path) -> subprocess.Popen:
    """`python -m splitwave server ARGS` (the package's __main__, as a user types it)."""
    return procs.start("server", [sys.executable, "-m", "splitwave", "server", *args], log)


def _term(procs: ProcessGroup) -> int:
    """SIGTERM the server (the graceful stop), then its exit code."""
    procs.stop(grace_s=30)
    return procs["server"].returncode


def test_taken_port_fails_in_one_line_before_any_export(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "server.log"
        with ProcessGroup(cwd=tmp_path, env=child_env(omp_threads=1)) as procs:
            args = [str(cfg), "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
            proc = _server(procs, [*args, "--run-dir", str(tmp_path / "run")], log)
            rc = proc.wait(300)
    out = log.read_text()
    assert rc == 2, out
    errors = [line for line in out.splitlines() if "error" in line]
    assert errors == [
        f"splitwave server: error: cannot listen on 127.0.0.1:{port}: port {port} is already in use "
        f"(another server?); pick another --port, or --port 0 for a free one"
    ], out
    assert "Traceback" not in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing built, nothing written


@pytest.mark.slow  # two server starts, the first exporting a bundle into its own cache (~60 s on CI)
def test_server_says_what_it_does(tmp_path):
    """First start: the run folder, that the bundle is exported and how long it took, no third-party warnings;
    a stop before any round says so. A second start finds the bundle and starts a run of its own."""
    raw = {**BASE, "name": "talk", "seed": 7, "rounds": {"num_rounds": 1}, "output_dir": str(tmp_path / "runs")}
    cfg = tmp_path / "talk.yaml"
    cfg.write_text(yaml.safe_dump(raw))  # seed 7: a bundle no other test has exported
    common = [str(cfg), "--port", "0", "--cache-dir", str(tmp_path / "cache")]
    logs, folders = [], []
    for start in ("first", "cached"):
        log, ready = tmp_path / f"{start}.log", tmp_path / f"{start}.ready"
        extra = ["--run-dir", str(tmp_path / "reused")] if start == "cached" else []
        if start == "cached":  # a stale metrics file of an earlier run in the same folder
            (tmp_path / "reused").mkdir()
            (tmp_path / "reused" / "server_metrics.jsonl").write_text('{"round": 0}\n')
        with ProcessGroup(cwd=tmp_path, env=child_env(omp_threads=1)) as procs:
            _server(procs, [*common, "--ready-file", str(ready), *extra], log)
            port = procs.wait_ready("server", ready, 600)
            assert f"listening on 127.0.0.1:{port}" in log.read_text()
            rc = _term(procs)
        out = log.read_text()
        assert rc == 0, out
        folders.append(re.search(r"run folder (\S+);", out).group(1))
        assert "stopped after 0 of 1 rounds" in out, out
        logs.append(out)
    first, cached = logs
    assert "exporting the edge bundle" in first and re.search(r"edge bundle exported in \d+\.\d s", first)
    for noise in ("Warning", "warnings.warn", "torchvision", "LOAD REPORT", "Loading weights"):
        assert noise not in first, noise
    assert "edge bundle found in the cache" in cached and "exporting" not in cached
    assert Path(folders[0]).parent == tmp_path / "runs" / "talk" and folders[1] == str(tmp_path / "reused")
    assert (tmp_path / "reused" / "server_metrics.jsonl").read_text() == ""  # never appended across runs
