"""One declaration per setting: the shard's config travels as one protobuf message, and the
gateway's and the shard's flags are built from the same dataclass fields."""

import argparse
from dataclasses import fields

import pytest

from shardgate.proto import config_pb2
from shardgate.proto.flags import add_flags, from_flags
from shardgate.proto.shard_config import BatchLimits, ReplicaSettings, ShardConfig
from shardgate.server import cli
from shardgate.server.config import GatewayConfig
from shardgate.server.replicas.launcher import shard_config
from shardgate.shards.main import ShardProcess, parse_args

CHANGED = ShardConfig(
    ReplicaSettings(model="/m", dtype="bfloat16", quantize="int8", device="cuda", block_size=32, kv_cache_memory=0.25, tp=2, pp=3),
    BatchLimits(max_batch_tokens=512, max_num_seqs=8, decode_steps=2),
    listen="127.0.0.1:5000",
    parent_pid=42,
    tls_cert="cert.pem",
    tls_key="key.pem",
    tls_client_ca="ca.pem",
    listen_token_file="token",
    insecure_listen=True,
)


def test_the_message_carries_every_setting():
    assert ShardConfig.from_bytes(CHANGED.to_bytes()) == CHANGED
    plain = ShardConfig(listen="unix:///x")
    assert ShardConfig.from_bytes(plain.to_bytes()) == plain  # defaults, and no TLS, survive too
    for cls, message in ((ShardConfig, config_pb2.ShardConfig), (ReplicaSettings, config_pb2.ReplicaSettings)):
        assert {f.name for f in fields(cls)} == set(message.DESCRIPTOR.fields_by_name)
    assert {f.name for f in fields(BatchLimits)} == set(config_pb2.BatchLimits.DESCRIPTOR.fields_by_name)


def test_a_bad_message_is_a_value_error():
    with pytest.raises(ValueError):
        ShardConfig.from_bytes(b"\xff\xff")


def test_the_gateway_hands_the_shard_its_serve_settings():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", "/m", "--dtype", "bfloat16", "--tp", "2", "--max-num-seqs", "8", "--kv-cache-memory", "1e9", "--decode-steps", "3"]
    )
    gateway = cli.config_from_args(args)
    config = shard_config(gateway.replica, gateway.scheduler, "unix:///d.sock", parent_pid=7)
    assert config.replica == ReplicaSettings(model="/m", dtype="bfloat16", tp=2, kv_cache_memory=1e9)
    assert config.limits == BatchLimits(max_num_seqs=8, decode_steps=3)
    assert (config.listen, config.parent_pid) == ("unix:///d.sock", 7)


def test_shard_flags_and_config_file_give_the_same_config(tmp_path):
    argv = ["--model", "/m", "--dtype", "bfloat16", "--quantize", "int8", "--device", "cuda", "--block-size", "32"]
    argv += ["--kv-cache-memory", "0.25", "--tp", "2", "--pp", "3", "--max-batch-tokens", "512", "--max-num-seqs", "8"]
    argv += ["--listen", "127.0.0.1:5000", "--parent-pid", "42", "--tls-cert", "cert.pem", "--tls-key", "key.pem"]
    argv += ["--tls-client-ca", "ca.pem", "--decode-steps", "2", "--listen-token-file", "token", "--insecure-listen"]
    assert parse_args(argv) == CHANGED
    path = tmp_path / "shard-config.pb"
    path.write_bytes(CHANGED.to_bytes())
    assert parse_args(["--config", str(path)]) == CHANGED
    with pytest.raises(ValueError, match="no other flag"):
        parse_args(["--config", str(path), "--tp", "2"])


def test_shard_flag_checks_are_the_dataclasses():
    with pytest.raises(ValueError, match="--listen is required"):
        parse_args([])
    with pytest.raises(ValueError, match="go together"):
        parse_args(["--listen", "x:1", "--tls-cert", "c.pem"])
    with pytest.raises(ValueError, match="block_size"):
        parse_args(["--listen", "x:1", "--block-size", "0"])


def test_a_tcp_driver_needs_mutual_tls_a_token_or_insecure_listen():
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]
    for flags in ([], ["--listen-token-file", "t"], ["--insecure-listen"], tls):
        ShardConfig(listen="unix:///d.sock").check_driver_link()
        config = parse_args(["--listen", "10.0.0.1:5000", *flags])
        if flags:
            config.check_driver_link()
        else:
            with pytest.raises(ValueError, match="is a TCP address: give it mutual TLS .* or a shared token"):
                config.check_driver_link()
    assert ShardProcess(parse_args(["--listen", "10.0.0.1:5000", "--tp", "2"]), rank=1, world_size=2).rank == 1  # only the driver listens
    with pytest.raises(ValueError, match="is a TCP address"):
        ShardProcess(parse_args(["--listen", "10.0.0.1:5000", "--tp", "2"]), rank=0, world_size=2)


def test_batch_limits_travel_in_describe_and_name_what_a_gateway_exceeds():
    limits = BatchLimits(max_batch_tokens=512, max_num_seqs=8, decode_steps=2)
    assert BatchLimits.from_message(limits.to_message()) == limits
    assert limits.exceeded_by(BatchLimits(max_batch_tokens=512, max_num_seqs=4, decode_steps=1)) == []
    assert limits.exceeded_by(BatchLimits(max_batch_tokens=1024, max_num_seqs=8, decode_steps=4)) == [
        "max_batch_tokens 1024 > 512",
        "decode_steps 4 > 2",
    ]


def test_serve_flags_keep_their_names_defaults_and_forms():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.config_from_args(parser.parse_args([])) == GatewayConfig()
    args = parser.parse_args(
        ["--remote-replica", "a:1", "--remote-replica", "b:2", "--embed-preferred-batch-sizes", "16,32", "--no-prefix-caching"]
        + ["--drain-timeout", "5", "--step-timeout", "9", "--replica-tls-ca", "ca", "--replica-tls-cert", "c", "--replica-tls-key", "k"]
    )
    config = cli.config_from_args(args)
    assert config.remote_replicas == ("a:1", "b:2") and config.embed.preferred_batch_sizes == (16, 32)
    assert config.scheduler.prefix_caching is False and (config.drain_timeout_s, config.supervision.step_timeout_s) == (5, 9)
    assert (config.security.replica_ca, config.security.replica_cert, config.security.replica_key) == ("ca", "c", "k")
    assert args.log_level == "INFO"
    with pytest.raises(SystemExit):
        parser.parse_args(["--embed-preferred-batch-sizes", "x"])


def test_from_flags_takes_given_sections_and_keeps_non_flag_defaults():
    parser = argparse.ArgumentParser()
    add_flags(parser, GatewayConfig)
    config = from_flags(GatewayConfig, parser.parse_args(["--max-num-seqs", "3"]))
    assert config.scheduler.max_num_seqs == 3 and config.replica.start_timeout_s == 900.0  # a flag since --compile
    assert config.max_stop_strings == GatewayConfig().max_stop_strings
