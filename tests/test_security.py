"""Transport security (TLS, mTLS) and authentication (session tokens, enrollment secret, allow list).

Certificates come from `splitwave.certs` (the code behind `splitwave certs`): a CA, a server certificate for
localhost/127.0.0.1/::1 and client certificates (one from a foreign CA).
"""

from __future__ import annotations

import json
import os
import stat

import grpc
import numpy as np
import pytest
from net_helpers import CAPS, ROOT, rpc_status, run_clients, serving, tiny_cfg

from splitwave.edge.security import channel_credentials
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as pb_grpc
from splitwave.protos.codec import encode
from splitwave.server.security import server_credentials

EDGE_CACHE = ROOT / ".cache" / "edge-tests"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Files from `splitwave certs` (CA, server cert for localhost/127.0.0.1/::1, clients e0/e1), plus a client
    certificate named e0 from another CA."""
    from splitwave.certs import make_cert, make_pki, new_key, write_cert, write_key

    d = tmp_path_factory.mktemp("pki")
    made = make_pki(d, clients=["e0", "e1"])
    out = {"ca": str(made.ca), "server_cert": str(made.server_cert), "server_key": str(made.server_key)}
    for cn, (cert, key) in made.clients.items():
        out[f"{cn}_cert"], out[f"{cn}_key"] = str(cert), str(key)
    rogue_key = new_key()
    rogue_ca = make_cert("Rogue CA", rogue_key, ca=True)
    k = new_key()
    out["rogue_cert"] = str(write_cert(d / "rogue.pem", make_cert("e0", k, rogue_ca, rogue_key, client=True)))
    out["rogue_key"] = str(write_key(d / "rogue.key", k))
    return out


def _sec_cfg(pki, mtls=False, num_clients=1):
    sec = {"insecure": False, "server_cert": pki["server_cert"], "server_key": pki["server_key"]}
    if mtls:
        sec["client_ca"] = pki["ca"]
    return tiny_cfg(num_clients=num_clients, server={"security": sec})


def _join(address, creds, name="probe", secret=""):
    ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with ch:
        req = pb.JoinRequest(client_name=name, enrollment_secret=secret, capabilities=CAPS)
        return pb_grpc.SplitWaveStub(ch).Join(req, timeout=5)


# -- TLS / mTLS --------------------------------------------------------------------------------------------


def test_tls_end_to_end_and_plaintext_refused(tmp_path, pki):
    cfg = _sec_cfg(pki)
    with serving(cfg, tmp_path / "run", credentials=server_credentials(cfg.server.security)) as srv:
        # a plaintext client cannot talk to a TLS server
        assert rpc_status(_join, srv.address, None)[0] == C.UNAVAILABLE
        res = run_clients(srv.address, ["e0"], EDGE_CACHE, credentials=channel_credentials(pki["ca"]))
        assert not isinstance(res["e0"], Exception), res
        assert res["e0"]["rounds"] == 2


def test_tls_client_rejects_server_from_unknown_ca(tmp_path, pki):
    cfg = _sec_cfg(pki)
    with serving(cfg, tmp_path / "run", credentials=server_credentials(cfg.server.security)) as srv:
        # trusting another CA: the server certificate does not verify
        code, _ = rpc_status(_join, srv.address, grpc.ssl_channel_credentials(open(pki["rogue_cert"], "rb").read()))
        assert code == C.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path, pki):
    cfg = _sec_cfg(pki, mtls=True)
    with serving(cfg, tmp_path / "run", credentials=server_credentials(cfg.server.security)) as srv:
        no_cert = channel_credentials(pki["ca"])
        assert rpc_status(_join, srv.address, no_cert)[0] == C.UNAVAILABLE
        foreign = channel_credentials(pki["ca"], pki["rogue_cert"], pki["rogue_key"])
        assert rpc_status(_join, srv.address, foreign)[0] == C.UNAVAILABLE
        assert not srv.app.by_client  # nobody got in
        ok = channel_credentials(pki["ca"], pki["e0_cert"], pki["e0_key"])
        res = run_clients(srv.address, ["e0"], EDGE_CACHE, credentials=ok)
        assert not isinstance(res["e0"], Exception), res
        assert res["e0"]["rounds"] == 2


def test_mtls_binds_client_id_and_token_to_the_certificate(tmp_path, pki):
    cfg = _sec_cfg(pki, mtls=True, num_clients=2)
    with serving(cfg, tmp_path / "run", credentials=server_credentials(cfg.server.security)) as srv:
        e0 = channel_credentials(pki["ca"], pki["e0_cert"], pki["e0_key"])
        e1 = channel_credentials(pki["ca"], pki["e1_cert"], pki["e1_key"])
        j0 = _join(srv.address, e0, name="e0")
        assert srv.app.by_client["e0"].identity == "e0"
        # e1's certificate cannot take over e0's client id ...
        code, details = rpc_status(_join, srv.address, e1, name="e0")
        assert code == C.PERMISSION_DENIED and "certificate" in details
        # ... nor use e0's (stolen) token
        with grpc.secure_channel(srv.address, e1) as ch:
            req = pb.RoundRequest(header=pb.Header(session_token=j0.session_token, run_id=j0.run_id), no_wait=True)
            code, details = rpc_status(lambda: list(pb_grpc.SplitWaveStub(ch).AwaitRound(req, timeout=5)))
        assert code == C.PERMISSION_DENIED, details
        # an empty client name defaults to the certificate's name
        assert _join(srv.address, e1, name="").client_id == "e1"


# -- authentication ----------------------------------------------------------------------------------------


def test_enrollment_secret(tmp_path):
    cfg = tiny_cfg(server={"security": {"enrollment_secret": "s3cret"}})
    with serving(cfg, tmp_path / "run") as srv:
        code, details = rpc_status(_join, srv.address, None, secret="guess")
        assert code == C.UNAUTHENTICATED and "enrollment secret" in details
        assert rpc_status(_join, srv.address, None, secret="")[0] == C.UNAUTHENTICATED
        res = run_clients(srv.address, ["e0"], EDGE_CACHE, enrollment_secret="s3cret")
        assert res["e0"]["rounds"] == 2


def test_allow_list(tmp_path):
    cfg = tiny_cfg(server={"security": {"allow_list": ["e0"]}})
    with serving(cfg, tmp_path / "run") as srv:
        code, details = rpc_status(_join, srv.address, None, name="mallory")
        assert code == C.PERMISSION_DENIED and "allow list" in details
        assert _join(srv.address, None, name="e0").client_id == "e0"


def test_tokens_are_random_bound_and_required_everywhere(tmp_path):
    cfg = tiny_cfg(num_clients=2)
    with serving(cfg, tmp_path / "run") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SplitWaveStub(ch)
        a = stub.Join(pb.JoinRequest(client_name="alice", capabilities=CAPS), timeout=5)
        b = stub.Join(pb.JoinRequest(client_name="bob", capabilities=CAPS), timeout=5)
        assert a.session_token != b.session_token and min(len(a.session_token), len(b.session_token)) >= 40
        bad = pb.Header(session_token="A" * 43, run_id=a.run_id)
        calls = {
            "GetBundle": lambda: list(stub.GetBundle(pb.BundleRequest(header=bad), timeout=5)),
            "Train": lambda: list(stub.Train(iter([pb.TrainRequest(header=bad, end_step=pb.StepEnd())]), timeout=5)),
            "Evaluate": lambda: list(
                stub.Evaluate(iter([pb.EvalRequest(header=bad, end_step=pb.StepEnd())]), timeout=5)
            ),
            "PushAdapter": lambda: stub.PushAdapter(
                iter([pb.AdapterRequest(header=bad, end=pb.AdapterEnd())]), timeout=5
            ),
            "AwaitRound": lambda: list(stub.AwaitRound(pb.RoundRequest(header=bad), timeout=5)),
            "Leave": lambda: stub.Leave(pb.LeaveRequest(header=bad), timeout=5),
        }
        for name, call in calls.items():
            assert rpc_status(call)[0] == C.UNAUTHENTICATED, name

        # round 0 is open for both; bob cannot slip frames under alice's token into his stream
        def hdr(j, step=0):
            return pb.Header(session_token=j.session_token, run_id=j.run_id, round=0, step=step)

        h = np.zeros((8, 16, 32), np.float32)
        msgs = [
            pb.TrainRequest(header=hdr(b), frame=encode("h", h)[0]),
            pb.TrainRequest(header=hdr(a), frame=encode("attention_mask", np.ones((8, 16), np.int64))[0]),
        ]
        code, details = rpc_status(lambda: list(stub.Train(iter(msgs), timeout=5)))
        assert code == C.PERMISSION_DENIED, details
        # the same for an adapter upload
        f = json.loads(a.manifest_json)["factors"][0]
        push = [
            pb.AdapterRequest(header=hdr(b), frame=encode(f["name"], np.zeros(f["shape"], np.float32))[0]),
            pb.AdapterRequest(header=hdr(a), end=pb.AdapterEnd(num_samples=1)),
        ]
        code, details = rpc_status(lambda: stub.PushAdapter(iter(push), timeout=5))
        assert code == C.PERMISSION_DENIED, details
        # what a token can do is bound to its own client id: there is no field naming another client, so an
        # upload under bob's token lands on bob, and AwaitRound under bob's token sends bob's view only
        assert srv.app.session(b.session_token, b.run_id).client_id == "bob"
        # after Leave the token is dead
        stub.Leave(pb.LeaveRequest(header=hdr(a)), timeout=5)
        code, _ = rpc_status(lambda: list(stub.AwaitRound(pb.RoundRequest(header=hdr(a)), timeout=5)))
        assert code == C.UNAUTHENTICATED


def test_insecure_config_with_certificates_is_refused():
    from splitwave.common.config import SecurityConfig

    with pytest.raises(ValueError, match="pick one"):
        server_credentials(SecurityConfig(insecure=True, server_cert="x", server_key="y"))
    with pytest.raises(ValueError, match="needs server_cert"):
        server_credentials(SecurityConfig(insecure=False))
    with pytest.raises(ValueError, match="go together"):
        channel_credentials("ca.pem", cert="c.pem")


def test_certs_command_writes_the_files_the_readme_uses(tmp_path, monkeypatch, capsys):
    from cryptography import x509

    from splitwave.cli import main

    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):  # main() sets these
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--hosts", "edge-server.lan", "10.0.0.7", "--clients", "phone-1"]) == 0
    assert "--set server.security.server_cert=" in capsys.readouterr().out
    for f in ("ca.key", "server.key", "phone-1.key"):
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o600, f
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["edge-server.lan"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    ca = (out / "ca.pem").read_bytes()
    # a second call adds a client under the same CA and keeps the server certificate (no --hosts)
    assert main(["certs", str(out), "--clients", "phone-2"]) == 0
    assert (out / "ca.pem").read_bytes() == ca
    assert x509.load_pem_x509_certificate((out / "server.pem").read_bytes()) == server
    phone2 = x509.load_pem_x509_certificate((out / "phone-2.pem").read_bytes())
    phone2.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    assert phone2.subject.rfc4514_string() == "CN=phone-2"
    # names that would overwrite the CA or the server, and hosts that are not hosts, are refused in one line
    assert main(["certs", str(out), "--clients", "server"]) == 2
    assert main(["certs", str(out), "--hosts", "two words"]) == 2
    assert "not a host name or IP address" in capsys.readouterr().err
