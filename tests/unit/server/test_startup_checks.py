"""What `shardgate serve` says of its secrets before starting: errors for files that cannot
serve, one warning each for a file others can read and for a secret sent in the clear."""

import pytest

from shardgate.server.config import GatewayConfig, SecurityConfig
from shardgate.server.startup_checks import check_secrets

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("a-key\n")
    path.chmod(0o600)
    return path


def test_private_keys_on_loopback_or_behind_tls_need_no_warning(keys):
    assert check_secrets(GatewayConfig(security=SecurityConfig(api_key_file=str(keys)))) == []
    tls = SecurityConfig(api_key_file=str(keys), tls_cert="c.pem", tls_key="k.pem")
    assert check_secrets(GatewayConfig(host="0.0.0.0", security=tls)) == []


def test_keys_in_the_clear_on_a_network_address_and_a_key_file_others_read_each_warn_once(keys):
    keys.chmod(0o644)
    warnings = check_secrets(GatewayConfig(host="0.0.0.0", security=SecurityConfig(api_key_file=str(keys))))
    assert len(warnings) == 2
    assert "readable by group and others (mode 0644)" in warnings[0]
    assert warnings[1].startswith("--api-key-file without --tls-cert on --host 0.0.0.0: API keys cross the network in the clear")


def test_a_bad_key_or_token_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--api-key-file .*: cannot read it"):
        check_secrets(GatewayConfig(security=SecurityConfig(api_key_file=str(tmp_path / "missing"))))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ValueError, match="--replica-token-file .*: the file is empty"):
        check_secrets(GatewayConfig(remote_replicas=("h:1",), security=SecurityConfig(replica_token_file=str(empty))))


def test_a_replica_token_in_the_clear_across_the_network_warns(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    remote = ("127.0.0.1:50100", "10.0.0.7:50100")
    warnings = check_secrets(GatewayConfig(replicas=0, remote_replicas=remote, security=SecurityConfig(replica_token_file=str(token))))
    assert warnings == ["--replica-token-file without --replica-tls-*: the token crosses the network in the clear to 10.0.0.7:50100"]
    local = check_secrets(GatewayConfig(replicas=0, remote_replicas=remote[:1], security=SecurityConfig(replica_token_file=str(token))))
    assert local == []
