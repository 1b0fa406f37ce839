"""Transport security of the server: TLS with a server certificate, optionally mTLS (client certificates).

Plain TCP only when the config says `insecure: true`, and then with a warning, so that nobody runs an
unencrypted federated server by accident.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


def server_credentials(sec) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None for an explicitly insecure server."""
    if sec.insecure:
        if sec.server_cert or sec.server_key:
            raise ValueError("server.security: insecure is true but server_cert/server_key are set; pick one")
        log.warning("serving WITHOUT TLS (server.security.insecure: true): traffic and tokens are readable")
        return None
    if not (sec.server_cert and sec.server_key):
        raise ValueError("server.security: TLS needs server_cert and server_key (or insecure: true)")
    key, cert = Path(sec.server_key).read_bytes(), Path(sec.server_cert).read_bytes()
    if sec.client_ca:
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=Path(sec.client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([(key, cert)])
