import logging

import pytest
import torch

from shardgate.shards import cpu_kernels
from shardgate.shards.attention import AttentionMetadata, _decode, _gather, paged_attention


def random_case(num_seqs, heads, kv_heads, head_dim, block_size, lengths, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = 64
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    query = torch.randn(num_seqs, heads, head_dim, generator=generator).to(dtype)
    width = max(-(-length // block_size) for length in lengths) + 1  # a padding column past every context
    order = torch.randperm(num_blocks, generator=generator)
    tables = order[: num_seqs * width].view(num_seqs, width)
    return query, key_cache, value_cache, tables, torch.tensor(lengths)


def reference(query, key_cache, value_cache, tables, lengths, window):
    """The gather + SDPA path attention.py takes without the kernel."""
    context = torch.arange(tables.shape[1] * key_cache.shape[1])
    mask = context < lengths[:, None]
    if window:
        mask &= context >= lengths[:, None] - window
    k, v = _gather(key_cache, value_cache, tables)
    return _decode(query.float(), k.float(), v.float(), mask[:, None, None, :])


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(16, 4, 64), (9, 3, 64), (10, 2, 64), (8, 8, 128), (12, 2, 128), (4, 2, 16)],
    ids=["gqa4-d64", "gqa3-d64", "gqa5-d64", "mha-d128", "gqa6-d128", "gqa2-d16-scalar"],
)
@pytest.mark.parametrize("window", [0, 5])
def test_kernel_matches_gathered_sdpa(cpu_kernels_loaded, dtype, tolerance, heads, kv_heads, head_dim, window):
    lengths = [1, 7, 16, 33]  # one token, partial blocks, a whole block, blocks past a boundary
    query, key_cache, value_cache, tables, lens = random_case(4, heads, kv_heads, head_dim, 16, lengths, dtype)
    out = cpu_kernels_loaded(query, key_cache, value_cache, tables, lens, window, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), reference(query, key_cache, value_cache, tables, lens, window), atol=tolerance, rtol=tolerance)


def test_kernel_reads_strided_layer_views_of_one_cache(cpu_kernels_loaded):
    """The compiled step hands each layer a view of one (2, layers, ...) storage."""
    query, key_cache, value_cache, tables, lens = random_case(3, 8, 2, 64, 4, [3, 9, 12], torch.float32)
    storage = torch.stack((torch.stack((key_cache, key_cache * 2)), torch.stack((value_cache, value_cache * 2))))
    keys, values = storage[0].unbind(0), storage[1].unbind(0)
    out = cpu_kernels_loaded(query, keys[1], values[1], tables, lens, 0, 0.125)
    expected = reference(query, key_cache * 2, value_cache * 2, tables, lens, 0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decodes_in_a_mixed_step_take_the_kernel_and_match_the_gathered_path(cpu_kernels_loaded, monkeypatch):
    """paged_attention with a prefill beside decodes: the decodes' rows come out of the kernel,
    equal to the gather path's (the prefill still goes through SDPA)."""
    torch.manual_seed(0)
    block_size, heads, kv_heads, head_dim = 4, 4, 2, 16
    lens, starts = [1, 5, 1], [9, 0, 3]  # decode, prefill of 5, decode
    tables = [[0, 1, 2], [3, 4], [5]]
    total = sum(lens)
    query = torch.randn(total, heads, head_dim)
    key, value = torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, head_dim)
    caches = [torch.randn(8, block_size, kv_heads, head_dim) for _ in range(2)]
    metadata = AttentionMetadata.build(lens, starts, tables, block_size, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(
        cpu_kernels, "attend", lambda query, *args: calls.append(query.shape) or cpu_kernels_loaded(query, *args, head_dim**-0.5)
    )
    with_kernel = paged_attention(query, key, value, caches[0].clone(), caches[1].clone(), metadata)
    assert calls == [(2, heads, head_dim)]  # the two decodes, in one call
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    without = paged_attention(query, key, value, caches[0].clone(), caches[1].clone(), metadata)
    assert len(calls) == 1
    torch.testing.assert_close(with_kernel, without, atol=1e-5, rtol=1e-5)


def test_a_failed_build_logs_one_line_and_leaves_the_gather_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "build_name", lambda: "shardgate_cpu_kernels_nocompiler")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="shardgate.shard"):
        assert not cpu_kernels.load(tmp_path)
    assert not cpu_kernels.loaded()
    (line,) = [record.getMessage() for record in caplog.records if record.name == "shardgate.shard"]
    assert line.startswith("CPU decode kernels not built (") and "decode attention gathers its blocks" in line


def test_the_build_name_changes_with_the_source(monkeypatch):
    name = cpu_kernels.build_name()
    monkeypatch.setattr(cpu_kernels, "SOURCE", cpu_kernels.SOURCE + "\n// changed\n")
    assert cpu_kernels.build_name() != name


needs_bf16_dot = pytest.mark.skipif(not cpu_kernels._has_bf16_dot(), reason="the decode linear needs AVX512-BF16")


@needs_bf16_dot
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 64, 1024), (2, 100, 1000), (1, 7, 33), (2, 3, 576), (1, 563, 64)])
def test_decode_linear_is_the_float32_product_rounded_to_bfloat16(cpu_kernels_loaded, rows, out_features, in_features):
    """Row and column tails (N not a multiple of 8, K not of 32) included; float32 sums, so the
    only error is the output's rounding to bfloat16 (half a unit in the last place)."""
    generator = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    got = cpu_kernels.decode_linear(x, weight)
    exact = x.float() @ weight.float().T
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


@needs_bf16_dot
def test_decode_linear_keeps_leading_dimensions_and_reads_strided_weight_rows(cpu_kernels_loaded):
    wide = torch.randn(48, 160).to(torch.bfloat16)
    weight = wide[:, :128]  # rows 160 elements apart
    x = torch.randn(1, 1, 128).to(torch.bfloat16)
    got = cpu_kernels.decode_linear(x, weight)
    assert got.shape == (1, 1, 48)
    torch.testing.assert_close(got.float(), (x.float() @ weight.float().T).to(torch.bfloat16).float(), atol=0.05, rtol=2**-7)


@needs_bf16_dot
def test_only_bfloat16_decodes_of_one_or_two_rows_take_the_decode_linear(cpu_kernels_loaded, monkeypatch):
    from shardgate.shards.int8_linear import linear

    calls = []
    monkeypatch.setattr(cpu_kernels, "decode_linear", lambda x, weight: calls.append(x.shape[0]) or torch.nn.functional.linear(x, weight))
    weight, bias = torch.randn(16, 64).to(torch.bfloat16), torch.randn(16).to(torch.bfloat16)
    for rows in (1, 2, 4):
        linear(torch.randn(rows, 64).to(torch.bfloat16), weight, bias)
    linear(torch.randn(1, 64), weight.float())
    assert calls == [1, 2]
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    linear(torch.randn(1, 64).to(torch.bfloat16), weight)
    assert calls == [1, 2]


@needs_bf16_dot
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [
        (3, 16, 64),
        (8, 40, 64),
        (13, 256, 1024),
        (32, 1000, 1000),
        (64, 50, 2816),
        (251, 72, 192),
        (9, 17, 6),
        (16, 32, 128),
        (21, 48, 64),
        (24, 20, 64),
        (32, 4816, 64),
    ],
)
def test_packed_linear_is_the_float32_product_rounded_to_bfloat16(cpu_kernels_loaded, rows, out_features, in_features):
    """Row tails (not a multiple of 8 rows; from 16 rows, tiles of 16 and then of 8), column tails
    (N not a multiple of 16 or of the panel: 48 columns, 32 from 16 rows, the tail inside a
    16-row tile at 24 × 20) and long or short K; float32 sums, rounded once."""
    generator = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    packed = cpu_kernels.pack_weight(weight)
    assert packed.shape == (-(-out_features // 16), in_features // 2, 16, 2)
    got = cpu_kernels.packed_linear(x, packed, out_features)
    exact = x.float() @ weight.float().T
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * exact.abs().max()).all()


@needs_bf16_dot
def test_the_linears_give_what_one_thread_gives_whatever_the_thread_count(cpu_kernels_loaded):
    """The packed linear's threads take chunks of output columns in turn (parallel_chunks), the
    decode linear's a static share each: every column is made once, whatever the thread count.
    Shapes of several chunks (or shares) with a short last one."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(4816, 64, generator=generator).to(torch.bfloat16)
    packed = cpu_kernels.pack_weight(weight)
    rows = {1: torch.randn(1, 64, generator=generator).to(torch.bfloat16), 32: torch.randn(32, 64, generator=generator).to(torch.bfloat16)}
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((cpu_kernels.decode_linear(rows[1], weight), cpu_kernels.packed_linear(rows[32], packed, 4816)))
    finally:
        torch.set_num_threads(threads)
    for gemv, gemm in results[1:]:
        assert torch.equal(gemv, results[0][0]) and torch.equal(gemm, results[0][1])


@needs_bf16_dot
def test_packed_linear_keeps_leading_dimensions_and_refuses_a_mismatched_weight(cpu_kernels_loaded):
    weight = torch.randn(48, 128).to(torch.bfloat16)
    packed = cpu_kernels.pack_weight(weight)
    x = torch.randn(2, 5, 128).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.packed_linear(x, packed, 48), cpu_kernels.packed_linear(x.reshape(10, 128), packed, 48).view(2, 5, 48))
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.packed_linear(torch.randn(3, 64).to(torch.bfloat16), packed, 48)
    with pytest.raises(RuntimeError, match="blocks of 16"):
        cpu_kernels.packed_linear(x, packed, 70)


@needs_bf16_dot
def test_only_bfloat16_weights_of_even_width_are_packed(cpu_kernels_loaded, monkeypatch):
    assert cpu_kernels.pack_weight(torch.randn(16, 64)) is None
    assert cpu_kernels.pack_weight(torch.randn(16, 63).to(torch.bfloat16)) is None
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    assert cpu_kernels.pack_weight(torch.randn(16, 64).to(torch.bfloat16)) is None


@needs_bf16_dot
def test_three_to_256_rows_take_the_packed_linear_when_the_weight_has_a_packed_copy(cpu_kernels_loaded, monkeypatch):
    from shardgate.shards.int8_linear import linear

    calls = []
    real = cpu_kernels.packed_linear
    monkeypatch.setattr(cpu_kernels, "packed_linear", lambda x, packed, n: calls.append(x.numel() // x.shape[-1]) or real(x, packed, n))
    weight, bias = torch.randn(16, 64).to(torch.bfloat16), torch.randn(16).to(torch.bfloat16)
    packed = cpu_kernels.pack_weight(weight)
    for rows in (1, 2, 3, 64, 256, 257):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        got = linear(x, weight, bias, packed)
        torch.testing.assert_close(got.float(), torch.nn.functional.linear(x.float(), weight.float(), bias.float()), atol=0.1, rtol=0.02)
    linear(torch.randn(2, 4, 64).to(torch.bfloat16), weight, None, packed)  # 8 rows in two leading dimensions
    linear(torch.randn(8, 64).to(torch.bfloat16), weight)  # no packed copy
    assert calls == [3, 64, 256, 8]
