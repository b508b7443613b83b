"""`shardgate generate`, `embed` and `info` against the in-process fake server (connection
flags included)."""

import json

import grpc
from fake_inference import self_signed_certificate, start_fake_server

from shardgate.clients.cli import main


def test_embed_prints_one_json_line_per_input(server, capsys):
    assert main(["embed", "--addr", server.address, "--pooling", "last", "--normalize", "ab", "cde"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [
        {"index": 0, "tokens": 2, "embedding": [2, 0, 1, 1]},
        {"index": 1, "tokens": 3, "embedding": [3, 1, 1, 1]},
    ]
    assert "[2 embedding(s) of 4 dimensions, 5 tokens]" in err
    request = server.fake.calls[0].request
    assert list(request.inputs) == ["ab", "cde"] and request.normalize


def test_embed_reports_a_status_without_a_traceback(server, capsys):
    server.fake.failures = [(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")]
    assert main(["embed", "--addr", server.address, "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: UNIMPLEMENTED: Method not implemented!"


def test_info_prints_health_and_model(server, capsys):
    assert main(["info", "--addr", server.address]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["health", "SERVING"]
    assert "model                  fake" in out and "kv_capacity_tokens     1024" in out and "max_embed_inputs       8" in out


def test_info_fails_when_the_server_is_not_serving(server, capsys):
    from grpc_health.v1 import health_pb2

    server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["info", "--addr", server.address]) == 1
    assert capsys.readouterr().out.split() == ["health", "NOT_SERVING"]


def test_generate_streams_by_default_and_sends_flags(server, capsys):
    assert main(["generate", "--addr", server.address, "--max-new-tokens", "3", "--priority", "5", "--token", "t0k", "hi"]) == 0
    out, err = capsys.readouterr()
    assert out == "abc\n" and "[length: 2 prompt + 3 generated tokens" in err
    call = server.fake.calls[0]
    assert call.method == "GenerateStream" and call.request.priority == 5 and call.metadata["authorization"] == "Bearer t0k"
    assert main(["generate", "--addr", server.address, "--no-stream", "hi"]) == 0
    assert server.fake.calls[1].method == "Generate"


def test_generate_retries_when_asked(server, capsys):
    server.fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")]
    assert main(["generate", "--addr", server.address, "hi"]) == 1
    assert "error: UNAVAILABLE: starting" in capsys.readouterr().err
    server.fake.failures = [(grpc.StatusCode.UNAVAILABLE, "starting")]
    assert main(["generate", "--addr", server.address, "--retries", "2", "hi"]) == 0


def test_tls_flags(tmp_path, capsys):
    cert, key = self_signed_certificate("shardgate test server")
    (tmp_path / "ca.pem").write_bytes(cert)
    tls_server = start_fake_server(grpc.ssl_server_credentials([(key, cert)]))
    try:
        assert main(["info", "--addr", tls_server.address, "--ca-cert", str(tmp_path / "ca.pem")]) == 0
        assert main(["info", "--addr", tls_server.address, "--timeout", "2"]) == 1  # plaintext to a TLS port
    finally:
        tls_server.stop()
    assert "error: UNAVAILABLE" in capsys.readouterr().err
