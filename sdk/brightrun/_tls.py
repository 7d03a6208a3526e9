"""TLS for clients: channel credentials from friendly options or the environment.

``Client(tls=True)`` verifies the server with the system's CAs;
``root_certificates=`` names the CA (a PEM file, or its bytes) instead, and
``client_cert=`` / ``client_key=`` add a client certificate for servers that
require mutual TLS. Without arguments the environment decides:
``$BRIGHTRUN_TLS_CA``, ``$BRIGHTRUN_TLS_CERT`` and ``$BRIGHTRUN_TLS_KEY`` name
the same files, and ``$BRIGHTRUN_TLS=1`` turns TLS on with the system's CAs.
"""

from __future__ import annotations

import os
from typing import Final

import grpc

TLS_ENV: Final = "BRIGHTRUN_TLS"
TLS_CA_ENV: Final = "BRIGHTRUN_TLS_CA"
TLS_CERT_ENV: Final = "BRIGHTRUN_TLS_CERT"
TLS_KEY_ENV: Final = "BRIGHTRUN_TLS_KEY"

#: A PEM file's path, or the PEM bytes themselves.
Pem = str | os.PathLike[str] | bytes


def channel_credentials(
    *,
    tls: bool | None = None,
    root_certificates: Pem | None = None,
    client_cert: Pem | None = None,
    client_key: Pem | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials, or None for plaintext.

    Explicit arguments win over the environment; ``tls=False`` means plaintext
    whatever the environment says. ValueError when the options contradict each
    other, OSError when a file cannot be read."""
    friendly = root_certificates is not None or client_cert is not None or client_key is not None
    if credentials is not None:
        if friendly or tls is not None:
            raise ValueError("give either credentials= or tls= / root_certificates= / client_cert= / client_key=")
        return credentials
    if tls is False:
        if friendly:
            raise ValueError("tls=False contradicts root_certificates= / client_cert= / client_key=")
        return None
    if not friendly:
        root_certificates = os.environ.get(TLS_CA_ENV) or None
        client_cert = os.environ.get(TLS_CERT_ENV) or None
        client_key = os.environ.get(TLS_KEY_ENV) or None
        if tls is None:
            on = os.environ.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
            tls = on or root_certificates is not None or client_cert is not None or client_key is not None
    if not tls and not friendly:
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError(
            f"a client certificate needs its key and the key its certificate: give both client_cert= and "
            f"client_key= (or ${TLS_CERT_ENV} and ${TLS_KEY_ENV})"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "CA certificate"),
        private_key=_pem(client_key, "client key"),
        certificate_chain=_pem(client_cert, "client certificate"),
    )


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(e.errno, f"cannot read the {what} {os.fspath(value)}: {e.strerror}") from e
