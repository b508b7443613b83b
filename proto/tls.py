"""TLS credentials of every shardgate link: the public port, the gateway ↔ remote driver link,
and the client's channel. Certificates and keys are PEM bytes or paths of PEM files.

A leaf: it imports only the standard library and grpc (so the client-only install has it), and
nothing of the server, the shards or the clients.
"""

from __future__ import annotations

from pathlib import Path

import grpc

Pem = bytes | str | Path


def read_pem(value: Pem | None) -> bytes | None:
    """PEM bytes as given, or read from a path; None stays None."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def server_credentials(cert: Pem, key: Pem, client_ca: Pem | None = None) -> grpc.ServerCredentials:
    """TLS credentials of a listening port; with client_ca, clients must present a certificate
    it signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(read_pem(key), read_pem(cert))],
        root_certificates=read_pem(client_ca),
        require_client_auth=client_ca is not None,
    )


def channel_credentials(root_ca: Pem | None = None, key: Pem | None = None, cert: Pem | None = None) -> grpc.ChannelCredentials:
    """TLS credentials of a channel: root_ca checks the server (None: the system's roots); key
    and cert, when given, are this end's certificate for mutual TLS."""
    return grpc.ssl_channel_credentials(read_pem(root_ca), read_pem(key), read_pem(cert))
