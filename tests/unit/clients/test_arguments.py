"""The shared command flags: connection flags to client options, generation flags to request
parameters, N,M,... lists."""

import argparse

import pytest

from shardgate.clients import TLS, Retry
from shardgate.clients.tools.arguments import client_options, connection_arguments, generation_arguments, generation_params, int_list


def parse(*argv, max_new_tokens=64):
    parser = argparse.ArgumentParser()
    connection_arguments(parser)
    generation_arguments(parser, max_new_tokens=max_new_tokens)
    return parser.parse_args(argv)


def test_connection_flags_become_client_options():
    assert client_options(parse()) == dict(timeout=None, retry=Retry(attempts=1), tls=None, token=None)
    options = client_options(parse("--timeout", "2.5", "--retries", "4", "--token", "t", "--ca-cert", "ca.pem", "--server-name", "x"))
    assert options == dict(timeout=2.5, retry=Retry(attempts=5), tls=TLS(root_certificates="ca.pem", server_name="x"), token="t")
    assert client_options(parse("--tls"))["tls"] == TLS()
    assert parse().addr == "127.0.0.1:50051"
    for retries in ("-1", "5"):
        with pytest.raises(ValueError, match=r"--retries must be in \[0, 4\]"):
            client_options(parse("--retries", retries))
    with pytest.raises(ValueError, match="go together"):
        client_options(parse("--client-cert", "c.pem"))


def test_generation_params_hold_only_the_flags_given():
    assert generation_params(parse()) == {"max_new_tokens": 64}
    assert generation_params(parse(max_new_tokens=None)) == {}
    given = parse("--temperature", "0", "--stop", "a", "--stop", "b", "--ignore-eos", "--priority", "3", "--top-k", "5")
    assert generation_params(given) == {
        "max_new_tokens": 64,
        "temperature": 0.0,
        "stop": ["a", "b"],
        "ignore_eos": True,
        "priority": 3,
        "top_k": 5,
    }


def test_int_list_reads_one_or_more_integers():
    assert int_list("8") == (8,) and int_list("1,32") == (1, 32)
    for bad in ("1,x", "", "4,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
            int_list(bad)
