"""Development certificates for TLS / mTLS: one CA, a server certificate, client certificates.

`splitwave certs OUT_DIR` and the tests use the same code, so the recipe the README gives is the one the
tests run. These are for labs and trials (EC P-256 keys, no passphrase, short validity): a deployment
should use its own PKI.

Files: ca.pem (+ ca.key, needed only to sign more clients later), server.pem/server.key, <name>.pem/<name>.key.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `cryptography` is a server extra: imported where used, so the CLI parser stays light
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365


def new_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def san_entry(host: str) -> x509.GeneralName:
    """An IP address becomes an IP SAN (TLS clients check those, not DNS names, for numeric hosts)."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"not a host name or IP address: {host!r}") from None
        return x509.DNSName(host)


def make_cert(
    common_name: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer_cert: x509.Certificate | None = None,
    issuer_key: CertificateIssuerPrivateKeyTypes | None = None,
    ca: bool = False,
    hosts: list[str] | tuple[str, ...] = (),
    client: bool = False,
    days: int = DEFAULT_DAYS,
) -> x509.Certificate:
    """A certificate for `key`, self-signed when no issuer is given. `hosts` become SANs (server use)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([san_entry(h) for h in hosts]), critical=False)
    if not ca:
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key: PrivateKeyTypes) -> Path:
    """PKCS#8 PEM, unencrypted, readable by the owner only (created 0600, never world-readable in between)."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode under O_CREAT
    return path


def load_ca(out: Path) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """The CA certificate and key that `make_pki` wrote to `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    return cert, key


@dataclass
class Pki:
    """Paths of what `make_pki` wrote."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)
    hosts: list[str]  # the server certificate's SANs
    kept_server: bool = False  # the server certificate already there was kept


def check_name(name: str) -> str:
    if not name or name in ("ca", "server") or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ValueError(f"client name {name!r}: use a file-name-safe name other than 'ca' and 'server'")
    return name


def _sans(cert_path: Path) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names]


def make_pki(
    out_dir: str | Path,
    hosts: list[str] | tuple[str, ...] | None = None,
    clients: list[str] | tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    reuse_ca: bool = True,
) -> Pki:
    """Write a CA (or reuse the one in out_dir), a server certificate for `hosts` and one certificate per client.

    Reusing the CA lets a later call add clients that the running server (trusting ca.pem) accepts; such a call
    without `hosts` keeps the server certificate there. hosts None otherwise means DEFAULT_HOSTS.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [check_name(n) for n in clients]
    reuse = reuse_ca and (out / "ca.pem").exists() and (out / "ca.key").exists()
    keep_server = reuse and hosts is None and (out / "server.pem").exists() and (out / "server.key").exists()
    hosts = list(dict.fromkeys(DEFAULT_HOSTS if hosts is None else hosts))  # "$SERVER_HOST 127.0.0.1" may repeat
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    for h in hosts:
        san_entry(h)  # fail before writing anything
    if reuse:
        ca_cert, ca_key = load_ca(out)
    else:
        ca_key = new_key()
        ca_cert = make_cert("SplitWave development CA", ca_key, ca=True, days=days)
        write_key(out / "ca.key", ca_key)
        write_cert(out / "ca.pem", ca_cert)
    if keep_server:
        hosts = _sans(out / "server.pem")
    else:
        sk = new_key()
        write_key(out / "server.key", sk)
        write_cert(out / "server.pem", make_cert("splitwave-server", sk, ca_cert, ca_key, hosts=hosts, days=days))
    made = {}
    for n in names:
        k = new_key()
        made[n] = (
            write_cert(out / f"{n}.pem", make_cert(n, k, ca_cert, ca_key, client=True, days=days)),
            write_key(out / f"{n}.key", k),
        )
    return Pki(out, out / "ca.pem", out / "server.pem", out / "server.key", made, hosts, keep_server)
