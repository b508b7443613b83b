"""A server with --quantize int8 serves, and ModelInfo reports it, with fewer weight bytes per step."""

import pytest
import torch
from servers import start_server

from shardgate.shards.quantization import quantize_model, weight_bytes_per_step
from shardgate.shards.weights import load_model

KV = str(16 << 20)


def builtin_weight_bytes(quantization: str) -> int:
    model = load_model("builtin:tiny", torch.float32, "cpu").model
    quantize_model(model, quantization)
    return weight_bytes_per_step(model)


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_server_serves_and_reports_its_bytes(tp, tmp_path):
    dense, int8 = builtin_weight_bytes("none"), builtin_weight_bytes("int8")
    assert int8 < dense / 3  # float32 → int8 for all but norms, scales and the embedding
    server = start_server(tmp_path, "--quantize", "int8", "--tp", str(tp), "--kv-cache-memory", KV)
    try:
        with server.client() as client:
            info = client.model_info()
            result = client.generate("int8 weights", max_new_tokens=8, temperature=0, ignore_eos=True)
            again = client.generate("int8 weights", max_new_tokens=8, temperature=0, ignore_eos=True)
    finally:
        server.stop()
    assert info.quantization == "int8"
    assert len(result.token_ids) == 8 and again.token_ids == result.token_ids
    # KV bytes per token summed over the ranks: 2 (keys, values) × layers × kv heads × head dim × 4 bytes.
    assert info.kv_bytes_per_token == 2 * info.num_hidden_layers * info.num_key_value_heads * info.head_dim * 4
    if tp == 1:
        assert info.weight_bytes_per_step == int8
    else:  # two ranks: half the linears each, plus replicated norms and per-rank scales of row-parallel slices
        assert int8 < info.weight_bytes_per_step < 1.2 * int8


def test_unquantized_server_reports_none_and_dense_bytes(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", KV)
    try:
        with server.client() as client:
            info = client.model_info()
    finally:
        server.stop()
    assert info.quantization == "none"
    assert info.weight_bytes_per_step == builtin_weight_bytes("none")
    assert (info.num_hidden_layers, info.num_key_value_heads, info.head_dim) == (4, 2, 32)
