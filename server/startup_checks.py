"""What `shardgate serve` checks of its secrets before it starts anything: a key or token file
that cannot serve stops it with one line; a secret that others can read, or that would cross
the network in the clear, gets one warning line each."""

from __future__ import annotations

from shardgate.proto.link_auth import read_token
from shardgate.proto.secret_files import host_of, is_loopback, read_secret_lines, readable_by_others
from shardgate.server.config import GatewayConfig


def check_secrets(config: GatewayConfig) -> list[str]:
    """The warnings an operator should read; raises ValueError (naming the flag and the file)
    when the API key file or the replica token file is missing, unreadable or empty."""
    security = config.security
    warnings = []
    if security.api_key_file:
        read_secret_lines(security.api_key_file, "--api-key-file")
        warnings.append(readable_by_others(security.api_key_file, "--api-key-file"))
        if security.tls_cert is None and not is_loopback(config.host):
            warnings.append(
                f"--api-key-file without --tls-cert on --host {config.host}: API keys cross the network in the clear "
                "(serve TLS, or bind a loopback address behind a TLS proxy)"
            )
    if security.replica_token_file:
        read_token(security.replica_token_file, "--replica-token-file")
        warnings.append(readable_by_others(security.replica_token_file, "--replica-token-file"))
        exposed = [address for address in config.remote_replicas if not is_loopback(host_of(address))]
        if exposed and not security.replica_tls:
            warnings.append(
                f"--replica-token-file without --replica-tls-*: the token crosses the network in the clear to {', '.join(exposed)}"
            )
    return [warning for warning in warnings if warning is not None]
