"""Transport security of an edge client: TLS (trust a CA) and mTLS (present a client certificate)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """Channel credentials, or None for plain TCP (allowed, with a warning)."""
    if (cert is None) != (key is None):
        raise ValueError("client certificate and key go together (--cert and --key)")
    if ca is None:
        if cert:
            raise ValueError("a client certificate needs TLS: give --ca too")
        log.warning("connecting WITHOUT TLS: use --ca (and --cert/--key for mTLS) outside a lab")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
