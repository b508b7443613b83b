"""The flags that several `shardgate` commands share (connection, generation, workload) and
what they turn into."""

from __future__ import annotations

import argparse

from shardgate.clients.connection import MAX_ATTEMPTS, TLS, Retry
from shardgate.clients.tools.workload import Lengths
from shardgate.proto import flags


def connection_arguments(parser: argparse.ArgumentParser, *, addr_default: str | None = "127.0.0.1:50051") -> None:
    """The connection flags of every command that calls a server: --addr, --timeout, --retries, TLS and --token."""
    group = parser.add_argument_group("connection")
    group.add_argument("--addr", default=addr_default, help="server address host:port (default %(default)s)")
    group.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    group.add_argument(
        "--retries",
        type=int,
        default=0,
        help=f"extra attempts (at most {MAX_ATTEMPTS - 1}) for UNAVAILABLE/RESOURCE_EXHAUSTED before any token (default 0)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (the system's roots unless --ca-cert)")
    group.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate (implies --tls)")
    group.add_argument("--client-cert", help="PEM client certificate for mutual TLS (implies --tls)")
    group.add_argument("--client-key", help="PEM key of --client-cert")
    group.add_argument("--server-name", help="name to check the server's certificate against")
    group.add_argument("--token", help="bearer token sent as `authorization: Bearer TOKEN`")


def client_options(args: argparse.Namespace) -> dict:
    """Client/AsyncClient keyword arguments from the connection flags."""
    tls = None
    if args.tls or args.ca_cert or args.client_cert or args.client_key or args.server_name:
        tls = TLS(
            root_certificates=args.ca_cert, certificate_chain=args.client_cert, private_key=args.client_key, server_name=args.server_name
        )
    if not 0 <= args.retries < MAX_ATTEMPTS:
        raise ValueError(f"--retries must be in [0, {MAX_ATTEMPTS - 1}] (gRPC makes at most {MAX_ATTEMPTS} attempts)")
    return dict(timeout=args.timeout, retry=Retry(attempts=args.retries + 1), tls=tls, token=args.token)


def generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int | None = 64) -> None:
    """build_request's parameters as flags; unset ones stay None (see generation_params)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--priority", type=int, default=None, help="higher runs first (default 0)")


def generation_params(args: argparse.Namespace) -> dict:
    """The generation flags that were given (unset ones are left to build_request or the line)."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "priority")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def int_list(text: str) -> tuple[int, ...]:
    """`N` or `N,M,...`: one or more integers >= 0."""
    values = flags.int_list(text)
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload and load flags of `shardgate bench` and `shardgate tune`."""
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--num-requests",
        type=int_list,
        default=(64,),
        help="requests measured; N,M,... gives each --concurrency level its own (default 64)",
    )
    group.add_argument(
        "--prompt-len", type=Lengths.parse, default=Lengths(32, 32), help="prompt tokens: N or LOW:HIGH uniform (default 32)"
    )
    group.add_argument(
        "--output-len", type=Lengths.parse, default=Lengths(128, 128), help="new tokens: N or LOW:HIGH uniform (default 128)"
    )
    group.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    group.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="tokens every prompt starts with, the same for all, before its own --prompt-len (default %(default)s)",
    )
    group.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="generate exactly the output length (default on)"
    )
    group.add_argument(
        "--concurrency", type=int_list, default=None, help="closed loop: requests in flight; N,M,... runs each level in turn (default 8)"
    )
    group.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    group.add_argument("--warmup", type=int, default=2, help="short requests before measuring (default %(default)s)")
