"""The driver's one gateway session, and what it logs of its link at start."""

import logging

import pytest

from shardgate.proto.shard_config import ShardConfig
from shardgate.shards.driver import link_token, unix_socket_path
from shardgate.shards.link import SessionGate


def test_one_session_at_a_time_and_only_its_id_is_admitted():
    gate = SessionGate()
    assert not gate.admits(None) and not gate.admits("")
    first = gate.open()
    assert first and gate.open() is None
    assert gate.admits(first) and not gate.admits(first[:-1] + "x") and not gate.admits(None)
    gate.close("someone-else")  # only the session's own end closes it
    assert gate.admits(first)
    gate.close(first)
    assert not gate.admits(first)
    second = gate.open()
    assert second and second != first


TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def warnings_of(caplog, config: ShardConfig):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardgate.shard"):
        token = link_token(config)
    return token, [record.getMessage() for record in caplog.records]


def test_the_driver_says_once_what_an_operator_should_know_of_its_link(caplog, token_file):
    assert warnings_of(caplog, ShardConfig(listen="unix:///d.sock")) == (None, [])
    assert warnings_of(caplog, ShardConfig(listen="127.0.0.1:5000", listen_token_file=str(token_file))) == (TOKEN, [])
    token, [open_port] = warnings_of(caplog, ShardConfig(listen="127.0.0.1:5000", insecure_listen=True))
    assert token is None and open_port.startswith("--insecure-listen: the driver on 127.0.0.1:5000 serves anyone who can reach it")
    _, [clear] = warnings_of(caplog, ShardConfig(listen="10.0.0.1:5000", listen_token_file=str(token_file)))
    assert "the token crosses the network in the clear" in clear
    tls = dict(tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem")
    assert warnings_of(caplog, ShardConfig(listen="10.0.0.1:5000", listen_token_file=str(token_file), **tls)) == (TOKEN, [])
    token_file.chmod(0o640)
    _, [readable] = warnings_of(caplog, ShardConfig(listen="127.0.0.1:5000", listen_token_file=str(token_file)))
    assert "is readable by group (mode 0640)" in readable


def test_unix_socket_paths():
    assert [unix_socket_path(a) for a in ("unix:///tmp/d.sock", "unix:rel/d.sock", "127.0.0.1:1")] == ["/tmp/d.sock", "rel/d.sock", None]
