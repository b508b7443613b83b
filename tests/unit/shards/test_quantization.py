"""Weight-only int8: the quantizer's error bound, both matmul paths, models (tied heads, tensor
parallelism), and the weight/KV byte accounting the shard reports."""

import threading

import pytest
import torch
import torch.nn.functional as F
from thread_tp import run_ranks

from shardgate.server.config import ReplicaConfig
from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.int8_linear import INT8PACK_MAX_ROWS, Int8Weight, Scratch, linear, quantize_rows
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.layers import VocabParallelEmbedding
from shardgate.shards.main import parse_args
from shardgate.shards.parallel import ParallelConfig, ParallelState
from shardgate.shards.quantization import quantize_model, weight_bytes_per_step
from shardgate.shards.weights import LoadedModel, load_model

CPU = torch.device("cpu")
LOAD_LOCK = threading.Lock()  # accelerate's init_empty_weights patches nn.Module process-wide (see test_parallel)
PROMPT = torch.randint(3, 290, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Float32 logits (len(ids), vocab) of one sequence prefilled in one chunk."""
    block_size = 4
    num_blocks = -(-len(ids) // block_size)
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, block_size, next(loaded.model.parameters()).dtype, CPU)
    metadata = AttentionMetadata.build([len(ids)], [0], [list(range(num_blocks))], block_size, CPU, loaded.config.sliding_window)
    with torch.inference_mode():
        return loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(len(ids)), metadata, kv_cache))


def quantized(source: str, dtype: torch.dtype = torch.float32, parallel: ParallelState | None = None) -> LoadedModel:
    with LOAD_LOCK:
        loaded = load_model(source, dtype, CPU, parallel)
    quantize_model(loaded.model, "int8")
    return loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_is_within_half_a_step_per_row(dtype):
    weight = (torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]).to(dtype)  # rows of very different range
    weight[5] = 0  # an all-zero row (the padding rows of a vocabulary shard)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (64,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(64) != 5] >= 126).all()  # each row uses the range
    assert (q[5] == 0).all() and torch.isfinite(scale).all()
    error = (q.float() * scale.float()[:, None] - weight.float()).abs()
    assert (error <= scale.float()[:, None] / 2 * 1.001).all()


def test_int8_weight_matches_its_dequantized_weight_on_both_paths():
    weight = torch.randn(40, 24) * 0.1
    int8 = Int8Weight(weight, Scratch(40 * 24, torch.float32, CPU))
    bias = torch.randn(40)
    assert int8.nbytes == 40 * 24 + 40 * 4
    for rows in (1, INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 1, 50):  # int8pack, then convert + linear
        x = torch.randn(rows, 24)
        torch.testing.assert_close(int8.linear(x, bias), F.linear(x, int8.dequantize(), bias), rtol=1e-5, atol=1e-5)
        close_to_dense = (int8.linear(x) - F.linear(x, weight)).abs().max() / F.linear(x, weight).abs().max()
        assert close_to_dense < 0.02
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))  # a dense weight is plain F.linear
    strided = torch.randn(24, 3).T  # (3, 24), not contiguous
    torch.testing.assert_close(int8.linear(strided), F.linear(strided, int8.dequantize()), rtol=1e-5, atol=1e-5)


def test_a_weight_larger_than_the_scratch_is_done_in_chunks():
    weight = torch.randn(50, 8, dtype=torch.bfloat16)
    small = Int8Weight(weight, Scratch(3 * 8, torch.bfloat16, CPU))  # 3 rows at a time: 17 chunks, the last of 2
    whole = Int8Weight(weight, Scratch(50 * 8, torch.bfloat16, CPU))
    x = torch.randn(2, INT8PACK_MAX_ROWS + 3, 8, dtype=torch.bfloat16)  # leading dims are kept
    assert small.linear(x).shape == (2, INT8PACK_MAX_ROWS + 3, 50)
    torch.testing.assert_close(small.linear(x), whole.linear(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_int8_moves_logits_about_as_much_as_bfloat16_rounding(kind, checkpoint):
    # These random checkpoints amplify any perturbation (bfloat16 alone moves the logits by a
    # few percent), so int8 is judged against bfloat16: per-channel int8 has ~7× bfloat16's
    # weight error, which ends up within a small factor of it at the logits.
    folder = str(checkpoint(kind))
    exact = load_model(folder, torch.float32, CPU)
    bf16 = load_model(folder, torch.bfloat16, CPU)
    int8 = quantized(folder, torch.bfloat16)
    for ids in (PROMPT, PROMPT[:3]):  # 40 rows: convert + linear; 3 rows: int8pack
        reference = logits(exact, ids)
        bf16_error, int8_error = (rms(logits(m, ids) - reference) for m in (bf16, int8))
        print(f"{kind} {len(ids)} rows: logits rms error bf16 {bf16_error:.4f}, int8 {int8_error:.4f}")
        assert int8_error < 3 * bf16_error


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def test_tied_head_gets_its_own_int8_copy_and_the_embedding_stays_dense(checkpoint):
    folder = str(checkpoint("qwen2"))
    dense = load_model(folder, torch.float32, CPU)
    int8 = quantized(folder)
    model = int8.model
    assert isinstance(model.lm_head.weight, Int8Weight)
    assert isinstance(model.model.embed_tokens.weight, torch.nn.Parameter)
    torch.testing.assert_close(model.model.embed_tokens.weight, dense.model.model.embed_tokens.weight, rtol=0, atol=0)
    layer = model.model.layers["0"]
    assert isinstance(layer.self_attn.q_proj.weight, Int8Weight) and layer.self_attn.q_proj.bias.dtype == torch.float32
    assert isinstance(layer.mlp.down_proj.weight, Int8Weight)
    assert isinstance(layer.input_layernorm.weight, torch.nn.Parameter)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tensor_parallel_quantized_ranks_match_one_quantized_rank(kind, checkpoint):
    # qwen2: one kv head shared by both ranks, a padded vocabulary, a tied head.
    folder = str(checkpoint(kind))
    dense = logits(load_model(folder, torch.float32, CPU), PROMPT)
    single = logits(quantized(folder), PROMPT)
    ranks = run_ranks(2, lambda tp: logits(quantized(folder, parallel=ParallelState(ParallelConfig(tp_size=2), tp.rank, tp)), PROMPT))
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)  # the LM head's all-gather gives every rank all logits
    # Column-parallel slices are whole rows (the same scales as one rank); row-parallel ranks
    # scale their own column slices, a different rounding of the same weights: the two int8
    # models differ by less than either differs from the dense one.
    print(f"{kind}: logits rms tp2-vs-tp1 int8 {rms(ranks[0] - single):.4f}, int8-vs-dense {rms(single - dense):.4f}")
    assert rms(ranks[0] - single) < rms(single - dense)
    assert (ranks[0].argmax(-1) == single.argmax(-1)).float().mean() >= 0.9


def test_weight_bytes_count_every_parameter_but_the_embedding_table(checkpoint):
    folder = str(checkpoint("llama"))  # untied
    loaded = load_model(folder, torch.float32, CPU)
    params = dict(loaded.model.named_parameters())
    dense = sum(p.nbytes for name, p in params.items() if name != "model.embed_tokens.weight")
    assert weight_bytes_per_step(loaded.model) == dense
    linears = [m for m in loaded.model.modules() if hasattr(m, "weight_loader") and not isinstance(m, VocabParallelEmbedding)]
    norms_and_biases = dense - sum(m.weight.nbytes for m in linears)
    quantize_model(loaded.model, "int8")
    int8 = sum(m.weight.qweight.numel() + 4 * m.weight.shape[0] for m in linears)  # int8 rows + float32 scales
    assert weight_bytes_per_step(loaded.model) == norms_and_biases + int8


def test_a_tied_head_reads_the_whole_table(checkpoint):
    loaded = load_model(str(checkpoint("qwen2")), torch.float32, CPU)
    table = loaded.model.model.embed_tokens.weight
    others = sum(p.nbytes for name, p in loaded.model.named_parameters() if name != "model.embed_tokens.weight")
    assert weight_bytes_per_step(loaded.model) == others + table.nbytes  # counted once, as the head


def test_kv_cache_bytes_per_token_is_two_layers_heads_head_dim_dtype():
    loaded = load_model("builtin:tiny", torch.bfloat16, CPU)
    cache = KVCache(loaded.model.kv_layout, 10, 16, torch.bfloat16, CPU)
    config = loaded.config
    assert cache.nbytes // (10 * 16) == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2


def test_quantize_settings_are_checked():
    with pytest.raises(ValueError, match="quantization must be one of none, int8"):
        quantize_model(torch.nn.Linear(2, 2), "int4")
    with pytest.raises(ValueError, match="quantize"):
        ReplicaConfig(quantize="int4")
    assert parse_args(["--listen", "unix:///x", "--quantize", "int8"]).replica.quantize == "int8"
    model = torch.nn.Sequential()
    quantize_model(model, "none")  # nothing to do
