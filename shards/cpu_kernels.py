"""C++ decode kernels for CPU, built once per host kind and loaded with --compile.

- **Paged decode attention** (`shardgate_kernels::paged_decode_attention`, and
  `paged_decode_step`, which writes the new keys and values first): single-token queries read
  their context straight from the paged KV cache, block by block through the block table,
  without gathering it first. Pure torch has no paged attention that reads blocks in place. The
  block gather plus `scaled_dot_product_attention` that attention.py falls back to copies every
  sequence's whole context each layer, and SDPA's CPU kernels are built for long query blocks:
  for a decode's handful of query rows per kv head they spend far more time than the arithmetic
  needs (measured on the bench model, bf16, 32 sequences of 96 tokens: about 0.5 ms a layer,
  for 6 MFLOP). This kernel does, for each (sequence, kv head) in parallel: scores of the kv
  head's query heads against every key of the context (float32 accumulation), softmax, and the
  weighted sum of the values — each key and value read once from memory, from its block. With
  AVX-512 (head dim 64 or 128) it prefetches the item's keys and values first, takes one query
  head's scores 16 positions at a time (bf16 keys by `vdpbf16ps` against the bf16 query; the
  16 sums by one transpose-and-add tree), and sums values for a tile of query heads at once,
  widening each value row once per tile: 0.74–0.87× the time of its first version, which
  reduced each score on its own and went over the values once per query head (README). Its
  third version prefetches keys into L2 rather than L1, takes the scores' maximum and the
  softmax's scaling in vector code (the weights stay unnormalised; each head's value sums are
  scaled once, as they are stored), and stores the output 16 lanes at a time: 0.88–0.91× the
  time of the second at 96 to 1024 positions with the cache out of L3 (README).
- **Decode linear** (`shardgate_kernels::decode_linear`): y = x Wᵀ for one or two rows of
  bfloat16 x, on CPUs with AVX512-BF16. A batch-1 decode is bound by reading the weights; this
  kernel reads each weight row once as a stream the prefetcher follows (prefetching two blocks
  of rows ahead into L2) and sums in float32 with `vdpbf16ps`. On the bench model's linears it
  reads at about the machine's measured read bandwidth, 1.3–1.4× faster than oneDNN's prepacked
  kernels at one and two rows.
- **Packed linear** (`shardgate_kernels::packed_linear`): y = x Wᵀ for 3 to 256 rows of bfloat16
  x, with W packed once at load (pack_weight: pairs of consecutive k for 16 output columns per
  64 bytes, the operand layout of `vdpbf16ps`). Blocks of 8 rows keep 8 × 48 float32 sums in
  registers against a broadcast pair of x; each panel of 48 columns is read from memory for the
  first block of rows and from L2 for the next. On the bench model's linears it is 1.05–1.4×
  faster than oneDNN's prepacked GEMM from 8 to 64 rows, and 1.05–1.25× at 96 to 256 rows (the
  prefill of a prompt, a mixed step); longer prefills keep oneDNN, which is as fast or faster from
  512 rows on SmolLM2's linears and from 2048 on the bench model's. A model's weights do not
  fit in L3, so each panel's first tile of rows reads it from memory; from 8 rows, the panel's
  last tile therefore prefetches the panel its thread takes next into L2 (parallel_chunks tells
  the body which), and that panel's first tile finds it there: on the bench model's linears at
  32 rows 0.94–0.96× the time (414 against 390 GFLOP/s; 455 is this CPU's vdpbf16ps peak),
  at 16 rows 0.92×, on SmolLM2's 0.88–0.94× from 8 to 32 rows.
- **Greedy tokens** (`shardgate_kernels::argmax_rows`): each row's argmax of a step's logits in
  one pass, in the dtype the LM head made them (bfloat16 widened in registers, which is exact),
  NaN counting as the largest as in torch. torch's CPU argmax over a long row is a scalar loop,
  and the float32 copy of a batch's logits before it cost as much again (sampler.argmax).

The packed linear and the attention kernel split their work between torch's threads in chunks
that each thread takes as it finishes the last (parallel_chunks), not in one static share per
thread: where other processes share the cores (a gateway and its clients beside the replica), a
thread the OS pauses no longer holds the others at the end of the region for its whole share. On
the bench model's linears at 32 rows beside a neighbour using 15–17% of a core: 0.91–0.95× the
time of the static split; alone, the same time. The decode linear keeps the static split: it
streams the weights at the read bandwidth, and chunks made it 1.02–1.03× slower alone (README,
Performance).

They are built with torch.utils.cpp_extension (ninja and the C++ compiler inductor uses) into
the compile cache folder, under a name that carries a hash of their source, the torch version
and this CPU's instruction-set flags (built for this CPU, -march=native), so a cache folder
shared by different hosts keeps one build per kind. Loaded once per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger("shardgate.shard")

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Runs body(first, last, following) over [0, count) in chunks (about 32 a thread) that the
// threads take in turn as each finishes its last one (an atomic counter), instead of
// at::parallel_for's static split into one range per thread. On a host whose cores other
// processes also use (the gateway and clients beside a replica), the OS takes one thread away now
// and then; with a static split the others then wait at the region's end for its whole share,
// with chunks they take over its remaining work. (32 a thread did better beside such a neighbour
// than 8; README, Performance.) A thread claims its next chunk before it runs this one, so the
// body knows where it goes next (`following`: that chunk's first item, or -1 for none) and can
// prefetch it.
template <typename Body>
void parallel_chunks(int64_t count, const Body& body) {
  const int64_t chunk = std::max<int64_t>(1, count / (32 * at::get_num_threads()));
  const int64_t chunks = (count + chunk - 1) / chunk;
  if (chunks <= 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    body(0, count, int64_t{-1});
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t first = next.fetch_add(chunk, std::memory_order_relaxed); first < count;) {
      const int64_t following = next.fetch_add(chunk, std::memory_order_relaxed);
      body(first, std::min(first + chunk, count), following < count ? following : int64_t{-1});
      first = following;
    }
  });
}

inline float widen(float value) { return value; }
inline float widen(c10::BFloat16 value) { return static_cast<float>(value); }
inline float widen(c10::Half value) { return static_cast<float>(value); }

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2,
// p a degree-6 Taylor polynomial (relative error below 2e-7 on that range).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__)
// exp(s - max) of each of `group` rows of `count` scores, in place, and inverse[g] = 1 / the row's
// sum. The decode kernel keeps the weights unnormalised and scales its value sums once, at the
// end; softmax_rows (the generic path's) scales the weights.
inline void exp_rows(float* scores, int64_t group, int64_t count, float* inverse) {
  const int64_t whole = count - count % kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (count - whole)) - 1);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * count;
    __m512 peak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < whole; i += kLanes) peak = _mm512_max_ps(peak, _mm512_loadu_ps(s + i));
    if (tail) peak = _mm512_mask_max_ps(peak, tail, peak, _mm512_maskz_loadu_ps(tail, s + whole));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < whole; i += kLanes) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), top));
      _mm512_storeu_ps(s + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + whole), top));
      _mm512_mask_storeu_ps(s + whole, tail, e);
      sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    inverse[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}
#endif

// Softmax of each of `group` rows of `count` scores, in place.
void softmax_rows(float* scores, int64_t group, int64_t count) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * count;
    float inverse;
#if defined(__AVX512F__)
    exp_rows(s, 1, count, &inverse);
#else
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < count; ++i) peak = std::max(peak, s[i]);
    float total = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      s[i] = std::exp(s[i] - peak);
      total += s[i];
    }
    inverse = 1.0f / total;
#endif
    for (int64_t j = 0; j < count; ++j) s[j] *= inverse;
  }
}

// Calls visit(block, slot, i) for positions first..length-1 (i counts from 0), block by block:
// no division per position.
template <typename Visit>
inline void for_each_position(const int64_t* table, int64_t block_size, int64_t first, int64_t length, Visit&& visit) {
  int64_t i = 0;
  for (int64_t column = first / block_size; column * block_size < length; ++column) {
    const int64_t block = table[column];
    const int64_t from = std::max(first - column * block_size, int64_t{0});
    const int64_t to = std::min(length - column * block_size, block_size);
    for (int64_t slot = from; slot < to; ++slot, ++i) visit(block, slot, i);
  }
}

#if defined(__AVX512F__)
// Lane j of the result: the sum of v[j]'s 16 lanes. A transpose-and-add tree: 45 instructions
// for 16 sums, where 16 separate horizontal sums take about three times as many.
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k) a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// One query head in registers; dot(key) is its 16-lane partial dot product with a key row.
template <typename T, int kChunks>
struct QueryHead {
  __m512 q[kChunks];
  explicit QueryHead(const T* query) {
    for (int c = 0; c < kChunks; ++c) q[c] = load16(query + c * kLanes);
  }
  __m512 dot(const T* key) const {
    __m512 sum = _mm512_mul_ps(q[0], load16(key));
    for (int c = 1; c < kChunks; ++c) sum = _mm512_fmadd_ps(q[c], load16(key + c * kLanes), sum);
    return sum;
  }
};

#if defined(__AVX512BF16__)
// bf16 keys against a bf16 query with vdpbf16ps: no widening, float32 sums.
template <int kChunks>
struct QueryHead<c10::BFloat16, kChunks> {
  static constexpr int kPairs = kChunks / 2;
  __m512bh q[kPairs];
  explicit QueryHead(const c10::BFloat16* query) {
    for (int c = 0; c < kPairs; ++c) q[c] = (__m512bh)_mm512_loadu_si512(query + c * 2 * kLanes);
  }
  __m512 dot(const c10::BFloat16* key) const {
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0], (__m512bh)_mm512_loadu_si512(key));
    for (int c = 1; c < kPairs; ++c) sum = _mm512_dpbf16_ps(sum, q[c], (__m512bh)_mm512_loadu_si512(key + c * 2 * kLanes));
    return sum;
  }
};
#endif

// 16 floats stored as T, rounded to nearest even as c10's conversions round (NaN as c10's NaN).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T, int kChunks, int kHint = _MM_HINT_T0>
inline void prefetch_row(const T* row) {
  constexpr int64_t bytes = kChunks * kLanes * sizeof(T);
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + at, static_cast<_mm_hint>(kHint));
}

// Value sums of kTile query heads at once, kept in registers: each value row is widened once
// per tile, not once per head.
template <typename T, int kChunks, int kTile>
void value_tile(const T* const* rows, const float* weights, int64_t count, float* acc) {
  __m512 sums[kTile][kChunks];
  for (int t = 0; t < kTile; ++t)
    for (int c = 0; c < kChunks; ++c) sums[t][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    __m512 row[kChunks];
    for (int c = 0; c < kChunks; ++c) row[c] = load16(rows[i] + c * kLanes);
    for (int t = 0; t < kTile; ++t) {
      const __m512 weight = _mm512_set1_ps(weights[t * count + i]);
      for (int c = 0; c < kChunks; ++c) sums[t][c] = _mm512_fmadd_ps(weight, row[c], sums[t][c]);
    }
  }
  for (int t = 0; t < kTile; ++t)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + (t * kChunks + c) * kLanes, sums[t][c]);
}

// One (sequence, kv head) with head_dim = 16 * kChunks, given its key and value rows. First every
// key and value row is prefetched into L2 (keys into L1 were 5–7% slower with the cache out of L3).
// Scores: per query head, 16 positions' partial dot products summed by one sum16. Values: query
// heads in register tiles, with unnormalised weights; the sums are scaled as they are stored.
template <typename T, int kChunks>
void attend_item_avx512(const T* query, const T* const* keys, const T* const* values, int64_t count, int64_t group, float scale,
                        float* scores, float* inverse, float* acc, T* out) {
  constexpr int64_t head_dim = kChunks * kLanes;
  constexpr int kTile = kChunks <= 4 ? 4 : 2;  // kTile * kChunks sums + kChunks row registers fit in 32
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < count; ++i) prefetch_row<T, kChunks, _MM_HINT_T1>(keys[i]);
  for (int64_t i = 0; i < count; ++i) prefetch_row<T, kChunks, _MM_HINT_T1>(values[i]);
  for (int64_t g = 0; g < group; ++g) {
    const QueryHead<T, kChunks> head(query + g * head_dim);
    float* s = scores + g * count;
    __m512 part[kLanes];
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
#pragma GCC unroll 16
      for (int p = 0; p < kLanes; ++p) part[p] = head.dot(keys[i + p]);
      _mm512_storeu_ps(s + i, _mm512_mul_ps(sum16(part), scale16));
    }
    if (i < count) {
      const int64_t n = count - i;
      for (int64_t p = 0; p < kLanes; ++p) part[p] = p < n ? head.dot(keys[i + p]) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(s + i, static_cast<__mmask16>((1u << n) - 1), _mm512_mul_ps(sum16(part), scale16));
    }
  }
  exp_rows(scores, group, count, inverse);
  int64_t g = 0;
  for (; g + kTile <= group; g += kTile) value_tile<T, kChunks, kTile>(values, scores + g * count, count, acc + g * head_dim);
  switch (group - g) {  // the last heads, fewer than a tile, as one smaller tile
    case 3: value_tile<T, kChunks, 3>(values, scores + g * count, count, acc + g * head_dim); break;
    case 2: value_tile<T, kChunks, 2>(values, scores + g * count, count, acc + g * head_dim); break;
    case 1: value_tile<T, kChunks, 1>(values, scores + g * count, count, acc + g * head_dim); break;
    default: break;
  }
  for (int64_t h = 0; h < group; ++h) {
    const __m512 scale_h = _mm512_set1_ps(inverse[h]);
    for (int c = 0; c < kChunks; ++c) {
      const int64_t at = h * head_dim + c * kLanes;
      store16(out + at, _mm512_mul_ps(_mm512_loadu_ps(acc + at), scale_h));
    }
  }
}
#endif

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
            const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window, double scale,
            at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t table_width = block_tables.size(1);
  const T* q_data = query.data_ptr<T>();
  const T* k_data = key_cache.data_ptr<T>();
  const T* v_data = value_cache.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t k_block = key_cache.stride(0), k_slot = key_cache.stride(1), k_head = key_cache.stride(2);
  const int64_t v_block = value_cache.stride(0), v_slot = value_cache.stride(1), v_head = value_cache.stride(2);
  const float scale_f = static_cast<float>(scale);

  struct Scratch {  // one per thread, reused by every chunk it takes
    std::vector<float> q, acc, inverse, scores;
    std::vector<const T*> keys, values;
  };
  std::vector<Scratch> scratch(at::get_num_threads());
  for (Scratch& one : scratch) {
    one.q.resize(group * head_dim);
    one.acc.resize(group * head_dim);
    one.inverse.resize(group);
  }
  parallel_chunks(num_seqs * num_kv_heads, [&](int64_t begin, int64_t end, int64_t) {
    auto& [q, acc, inverse, scores, keys, values] = scratch[at::get_thread_num()];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t length = std::min(lens[seq], table_width * block_size);
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t count = length - first;
      const T* q_seq = q_data + (seq * num_heads + kv_head * group) * head_dim;
      T* out_seq = out_data + (seq * num_heads + kv_head * group) * head_dim;
      if (count <= 0) {
        for (int64_t i = 0; i < group * head_dim; ++i) out_seq[i] = T(0);
        continue;
      }
      scores.resize(group * count);
      const int64_t* table = tables + seq * table_width;
#if defined(__AVX512F__)
      if (head_dim == 64 || head_dim == 128) {
        keys.resize(count);
        values.resize(count);
        for_each_position(table, block_size, first, length, [&](int64_t block, int64_t slot, int64_t i) {
          keys[i] = k_data + block * k_block + slot * k_slot + kv_head * k_head;
          values[i] = v_data + block * v_block + slot * v_slot + kv_head * v_head;
        });
        (head_dim == 64 ? attend_item_avx512<T, 4> : attend_item_avx512<T, 8>)(
            q_seq, keys.data(), values.data(), count, group, scale_f, scores.data(), inverse.data(), acc.data(), out_seq);
        continue;
      }
#endif
      for (int64_t i = 0; i < group * head_dim; ++i) q[i] = widen(q_seq[i]) * scale_f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for_each_position(table, block_size, first, length, [&](int64_t block, int64_t slot, int64_t i) {
        const T* key = k_data + block * k_block + slot * k_slot + kv_head * k_head;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q.data() + g * head_dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * widen(key[d]);
          scores[g * count + i] = dot;
        }
      });
      softmax_rows(scores.data(), group, count);
      for_each_position(table, block_size, first, length, [&](int64_t block, int64_t slot, int64_t i) {
        const T* value = v_data + block * v_block + slot * v_slot + kv_head * v_head;
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * count + i];
          float* ag = acc.data() + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) ag[d] += weight * widen(value[d]);
        }
      });
      for (int64_t i = 0; i < group * head_dim; ++i) out_seq[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t window,
                                  double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4, "query (B, H, D), caches (blocks, block_size, kv, D)");
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes() && key_cache.scalar_type() == query.scalar_type(), "caches match the query");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1 && key_cache.size(3) == query.size(2), "head_dim contiguous");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "query heads are a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables and lengths");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0) && context_lens.size(0) == query.size(0),
              "one table and length per query");
  at::Tensor q = query.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: attend<float>(q, key_cache, value_cache, tables, lens, window, scale, out); break;
    case at::kBFloat16: attend<c10::BFloat16>(q, key_cache, value_cache, tables, lens, window, scale, out); break;
    case at::kHalf: attend<c10::Half>(q, key_cache, value_cache, tables, lens, window, scale, out); break;
    default: TORCH_CHECK(false, "float32, bfloat16 or float16 only");
  }
  return out;
}

// The new tokens' keys and values (T, kv, D) into their cache slots (T,), then paged_decode_attention:
// a compiled decode step's whole attention in one call.
at::Tensor paged_decode_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                             at::Tensor& value_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t window, double scale) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.size(0) == slot_mapping.size(0),
              "key, value (T, kv, D), one slot each");
  TORCH_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3), "key rows match the cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && key.scalar_type() == key_cache.scalar_type(), "int64 slots, cache dtype");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1), block_size = key_cache.size(1);
  const at::Tensor slots = slot_mapping.contiguous(), keys = key.contiguous(), values = value.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t kv_heads = key.size(1), row_bytes = key.size(2) * key.element_size(), item = key.element_size();
  const char* key_rows = static_cast<const char*>(keys.data_ptr());
  const char* value_rows = static_cast<const char*>(values.data_ptr());
  char* k_base = static_cast<char*>(key_cache.data_ptr());
  char* v_base = static_cast<char*>(value_cache.data_ptr());
  for (int64_t t = 0; t < slots.size(0); ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot out of range");
    const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t source = (t * kv_heads + h) * row_bytes;
      const int64_t k_at = block * key_cache.stride(0) + offset * key_cache.stride(1) + h * key_cache.stride(2);
      const int64_t v_at = block * value_cache.stride(0) + offset * value_cache.stride(1) + h * value_cache.stride(2);
      std::memcpy(k_base + k_at * item, key_rows + source, row_bytes);
      std::memcpy(v_base + v_at * item, value_rows + source, row_bytes);
    }
  }
  return paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, window, scale);
}

#if defined(__AVX512BF16__)
constexpr int64_t kGemvRows = 8;         // weight rows per block: 8 accumulators per input row
constexpr int64_t kGemvPrefetchRows = 16; // prefetch (into L2) the rows two blocks ahead

// y[m, r + i] = x[m] · w[r + i] for i < R, every input row m; the first input row prefetches.
template <int R>
inline void gemv_rows(const uint16_t* w, int64_t ld, const uint16_t* x, int64_t rows, int64_t k, c10::BFloat16* y, int64_t n,
                      int64_t r) {
  const int64_t whole = k - k % 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (k - whole)) - 1);
  for (int64_t m = 0; m < rows; ++m) {
    const uint16_t* xm = x + m * k;
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < whole; c += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + c);
      for (int i = 0; i < R; ++i) {
        const uint16_t* row = w + (r + i) * ld + c;
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kGemvPrefetchRows * ld), _MM_HINT_T1);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(row), xv);
      }
    }
    if (whole < k) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xm + whole);
      for (int i = 0; i < R; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (r + i) * ld + whole), xv);
    }
    for (int i = 0; i < R; ++i) y[m * n + r + i] = c10::BFloat16(_mm512_reduce_add_ps(acc[i]));
  }
}
#endif

// y = x wᵀ for a few rows of x (..., K) and a bfloat16 weight (N, K) with unit column stride:
// each weight row is read once from memory (later input rows find it in cache), as a stream
// the prefetcher follows, with float32 sums. The batch-1 decode's linears are bound by reading
// their weights; oneDNN's prepacked kernels reach well under the read bandwidth there.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bfloat16 input and weight");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1 && x.size(-1) == weight.size(1), "weight (N, K) with rows of K");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  const at::Tensor xc = x.contiguous();
  const int64_t n = weight.size(0), k = weight.size(1), rows = xc.numel() / std::max<int64_t>(k, 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t ld = weight.stride(0), blocks = (n + kGemvRows - 1) / kGemvRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = b * kGemvRows;
      if (r + kGemvRows <= n) {
        gemv_rows<kGemvRows>(wp, ld, xp, rows, k, yp, n, r);
      } else {
        for (int64_t row = r; row < n; ++row) gemv_rows<1>(wp, ld, xp, rows, k, yp, n, row);
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "decode_linear needs AVX512-BF16");
  return x;
#endif
}

#if defined(__AVX512BF16__)
// The packed linear: y = x Wᵀ with W packed as (N/16, K/2, 16, 2) bf16 ("VNNI" pairs: 16 output
// columns × 2 consecutive k per 64 bytes, what one vdpbf16ps multiplies against a broadcast pair
// of x). A panel of 16-column blocks is streamed once from memory for the first tile of rows of x
// and read again from L2 for the next ones; each tile keeps rows × blocks float32 accumulators in
// registers. Two tile shapes, measured on the bench model's and SmolLM2's shapes (README,
// Performance): from 16 rows, tiles of 16 rows × 2 blocks prefetched into L1 (all 32 registers
// hold sums; vdpbf16ps takes x's pair as a memory broadcast), 3–5% faster than 8 × 3 at 16 and
// 24 rows and the same from 32; below 16 rows, and for the rows left over, tiles of 8 rows × 3
// blocks prefetched into L2 (2–3% faster than into L1).
constexpr int kRows = 8;
constexpr int kPanelBlocks = 3;
constexpr int kWideRows = 16;
constexpr int kWidePanelBlocks = 2;
constexpr int64_t kPrefetchPairs = 16;

template <int MR, int NZ, int kHint = _MM_HINT_T1>
inline void packed_tile(const uint16_t* x, int64_t k, const uint16_t* w, int64_t block_stride, uint16_t* y, int64_t n,
                        int64_t column, const uint16_t* ahead) {
  __m512 acc[MR][NZ];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NZ; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t pairs = k / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i wv[NZ];
    for (int j = 0; j < NZ; ++j) {
      wv[j] = _mm512_loadu_si512(w + j * block_stride + p * 32);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * block_stride + (p + kPrefetchPairs) * 32), static_cast<_mm_hint>(kHint));
      if (ahead != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * block_stride + p * 32), _MM_HINT_T1);
    }
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * k + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NZ; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, (__m512bh)wv[j]);
    }
  }
  for (int j = 0; j < NZ; ++j) {
    const int64_t first = column + j * 16;
    const __mmask16 mask = first + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - first)) - 1);
    for (int m = 0; m < MR; ++m)
      _mm256_mask_storeu_epi16(y + m * n + first, mask, (__m256i)_mm512_cvtneps_pbh(acc[m][j]));
  }
}

template <int NZ>
inline void packed_rows(int rows, const uint16_t* x, int64_t k, const uint16_t* w, int64_t block_stride, uint16_t* y,
                        int64_t n, int64_t column, const uint16_t* ahead) {
  switch (rows) {
    case 8: packed_tile<8, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 7: packed_tile<7, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 6: packed_tile<6, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 5: packed_tile<5, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 4: packed_tile<4, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 3: packed_tile<3, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    case 2: packed_tile<2, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
    default: packed_tile<1, NZ>(x, k, w, block_stride, y, n, column, ahead); break;
  }
}
#endif

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bfloat16 input and weight");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.is_contiguous(),
              "packed weight (N/16, K/2, 16, 2)");
  const int64_t k = x.size(-1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == k, "x has ", k, " columns, the packed weight ", packed.size(1) * 2);
  TORCH_CHECK(n > (blocks - 1) * 16 && n <= blocks * 16, "n = ", n, " does not fit ", blocks, " blocks of 16 columns");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / std::max<int64_t>(k, 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const bool wide = rows >= kWideRows;
  const int64_t panel_blocks = wide ? kWidePanelBlocks : kPanelBlocks;
  const int64_t block_stride = k * 16, panels = (blocks + panel_blocks - 1) / panel_blocks;
  parallel_chunks(panels, [&](int64_t begin, int64_t end, int64_t following) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t block = panel * panel_blocks, width = std::min<int64_t>(panel_blocks, blocks - block);
      const uint16_t* w = wp + block * block_stride;
      // The last tile of rows (one pass over K, like every tile) prefetches the whole panel this
      // thread takes next into L2, a line per block per pair, so that panel's first tile finds
      // its weights there rather than in memory (skipped when it is a narrower last panel).
      // Not below kRows rows: there a tile streams its weights at the read bandwidth, and the
      // extra prefetches made 4 rows 2% slower.
      const int64_t after = panel + 1 < end ? panel + 1 : following;
      const uint16_t* ahead =
          rows >= kRows && after >= 0 && (after + 1) * panel_blocks <= blocks ? wp + after * panel_blocks * block_stride : nullptr;
      int64_t row = 0;
      if (wide && width == kWidePanelBlocks) {
        for (; row + kWideRows <= rows; row += kWideRows)
          packed_tile<kWideRows, kWidePanelBlocks, _MM_HINT_T0>(xp + row * k, k, w, block_stride, yp + row * n, n,
                                                                block * 16, row + kWideRows == rows ? ahead : nullptr);
      }
      for (; row < rows; row += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, rows - row));
        const uint16_t* xr = xp + row * k;
        uint16_t* yr = yp + row * n;
        const uint16_t* next = row + count == rows ? ahead : nullptr;
        if (width == 3) packed_rows<3>(count, xr, k, w, block_stride, yr, n, block * 16, next);
        else if (width == 2) packed_rows<2>(count, xr, k, w, block_stride, yr, n, block * 16, next);
        else packed_rows<1>(count, xr, k, w, block_stride, yr, n, block * 16, next);
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "packed_linear needs AVX512-BF16");
  return x;
#endif
}

// The first index of a row's largest value, NaN counting as the largest (torch.argmax's rule):
// one pass, each of 16 lanes keeping its largest value and where it was (a strictly larger value
// replaces it, so a lane keeps its first), then the smallest index among the lanes holding the
// row's maximum.
template <typename T>
int64_t argmax_row(const T* row, int64_t count) {
#if defined(__AVX512F__)
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 best = lowest;
  __m512i best_at = _mm512_setzero_si512();
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(kLanes);
  for (int64_t i = 0; i < count; i += kLanes) {
    __m512 v;
    if (i + kLanes <= count) {
      v = load16(row + i);
    } else {  // the tail: copied into a padded buffer, the rest of it -inf
      float tail[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) tail[j] = i + j < count ? widen(row[i + j]) : -std::numeric_limits<float>::infinity();
      v = _mm512_loadu_ps(tail);
    }
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan) return i + __builtin_ctz(nan);
    const __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, larger, v);
    best_at = _mm512_mask_mov_epi32(best_at, larger, at);
    at = _mm512_add_epi32(at, step);
  }
  const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(top, best_at);
#else
  int64_t found = 0;
  float top = widen(row[0]);
  for (int64_t i = 0; i < count; ++i) {
    const float v = widen(row[i]);
    if (std::isnan(v)) return i;
    if (v > top) top = v, found = i;
  }
  return found;
#endif
}

// logits.argmax(-1) of (N, V) float32 or bfloat16 logits: the greedy tokens, read from the
// logits as the model made them (widening bfloat16 to float32 is exact, so the answer is the
// same as on float32 logits), rows in parallel.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.size(1) < (int64_t{1} << 31), "logits (N, V), 0 < V < 2^31");
  TORCH_CHECK(logits.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, "float32 or bfloat16 logits");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const auto each_row = [&](const auto* xp) {
    parallel_chunks(rows, [&](int64_t begin, int64_t end, int64_t) {
      for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * vocab, vocab);
    });
  };
  if (x.scalar_type() == at::kBFloat16) each_row(x.data_ptr<c10::BFloat16>());
  else each_row(x.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(shardgate_kernels, m) {
  m.def("decode_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("paged_decode_step(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, int window, float scale) -> Tensor");
  m.def("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor context_lens, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardgate_kernels, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_step", &paged_decode_step);
  m.impl("decode_linear", &decode_linear);
  m.impl("packed_linear", &packed_linear);
  m.impl("argmax_rows", &argmax_rows);
}
"""

_loaded = False
_bf16_dot = False
DECODE_LINEAR_MAX_ROWS = 2
"""Most rows of x that take decode_linear (it was 1.2× slower than oneDNN at 4 rows); more rows take
packed_linear when the weight has a packed copy."""
PACKED_LINEAR_MAX_ROWS = 256
"""Most rows of x that take packed_linear: it was measured faster than oneDNN's prepacked GEMM
from 4 to 256 rows on the bench model's and SmolLM2's linears (0.78–0.95× the time from 96 to
256 rows); at 512 rows oneDNN was as fast on the bench model's and faster on SmolLM2's (README,
Performance), so longer prefills keep it."""


def build_name() -> str:
    """The extension's name: a hash of its source, the torch version and this CPU's flags."""
    digest = hashlib.sha256(SOURCE.encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags().encode())
    return f"shardgate_cpu_kernels_{digest.hexdigest()[:16]}"


def _has_bf16_dot() -> bool:
    """Whether this CPU has AVX512-BF16 (the decode linear's instruction)."""
    return "avx512_bf16" in _cpu_flags().split()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def load(cache_dir: Path) -> bool:
    """Builds (or finds built in cache_dir/kernels) and loads the kernels; False, having logged
    why in one line, when it cannot (no compiler, no ninja, a build error)."""
    global _loaded, _bf16_dot
    if _loaded:
        return True
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        name = build_name()
        build_dir = cache_dir / "kernels" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load_inline(
            name=name,
            cpp_sources=[SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            no_implicit_headers=True,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except Exception as error:  # no compiler or ninja, an unwritable folder, a build error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning(
            "CPU decode kernels not built (%s: %s); decode attention gathers its blocks, linears stay with oneDNN",
            type(error).__name__,
            reason[:300],
        )
        return False
    _register_fake()
    _bf16_dot = _has_bf16_dot()
    _loaded = True
    return True


def attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v of single-token queries (B, H, D) over the cached positions
    [len - window, len) (window 0: from 0) of each sequence, read through its block table (B, W)."""
    return torch.ops.shardgate_kernels.paged_decode_attention(
        query, key_cache, value_cache, block_tables, context_lens, window, query.shape[-1] ** -0.5
    )


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """The new tokens' keys and values (T, kv, D) written into their slots, then attend: one
    opaque call in a compiled decode graph (no Python between its fused kernels)."""
    return torch.ops.shardgate_kernels.paged_decode_step(
        query, key, value, key_cache, value_cache, slot_mapping, block_tables, context_lens, window, query.shape[-1] ** -0.5
    )


def serves_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x Wᵀ goes through decode_linear: kernels loaded on an AVX512-BF16 CPU, bfloat16
    CPU tensors, a weight with unit column stride, and at most DECODE_LINEAR_MAX_ROWS rows of x."""
    return (
        _loaded
        and _bf16_dot
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.numel() <= DECODE_LINEAR_MAX_ROWS * x.shape[-1]
    )


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) Wᵀ for W (N, K): (..., N), in bfloat16 from float32 sums (see serves_linear)."""
    return torch.ops.shardgate_kernels.decode_linear(x, weight)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """W (N, K) packed for packed_linear: (⌈N/16⌉, K/2, 16, 2), zero-padded to whole blocks of 16
    output columns; None where packed_linear cannot serve it (kernels not loaded, no
    AVX512-BF16, not a bfloat16 CPU matrix, an odd K)."""
    if not (_loaded and _bf16_dot and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2):
        return None
    rows, cols = weight.shape
    if cols % 2:
        return None
    blocks = -(-rows // 16)
    padded = torch.zeros(blocks * 16, cols, dtype=weight.dtype)
    padded[:rows] = weight.detach()
    return padded.view(blocks, 16, cols // 2, 2).permute(0, 2, 1, 3).contiguous()


def serves_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether x takes packed_linear with this packed weight: bfloat16 CPU rows, more than
    DECODE_LINEAR_MAX_ROWS and at most PACKED_LINEAR_MAX_ROWS of them."""
    return (
        packed is not None
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and DECODE_LINEAR_MAX_ROWS * x.shape[-1] < x.numel() <= PACKED_LINEAR_MAX_ROWS * x.shape[-1]
    )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (..., K) Wᵀ for W packed by pack_weight: (..., out_features), in bfloat16 from float32 sums."""
    return torch.ops.shardgate_kernels.packed_linear(x, packed, out_features)


def serves_argmax(logits: torch.Tensor) -> bool:
    """Whether argmax_rows takes these logits: kernels loaded, (N, V) float32 or bfloat16 on CPU."""
    return (
        _loaded
        and logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.dim() == 2
        and logits.shape[1] > 0
    )


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) of (N, V) logits (see serves_argmax): int64 (N,), the first index of each
    row's maximum, NaN counting as the largest."""
    return torch.ops.shardgate_kernels.argmax_rows(logits)


def _register_fake() -> None:
    """Shapes of the ops for tracing (a compiled decode step calls paged_decode_step)."""
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake("shardgate_kernels::paged_decode_step")
    def _(query, key, value, key_cache, value_cache, slot_mapping, block_tables, context_lens, window, scale):
        return torch.empty_like(query)

    @torch.library.register_fake("shardgate_kernels::paged_decode_attention")
    def _(query, key_cache, value_cache, block_tables, context_lens, window, scale):
        return torch.empty_like(query)

    @torch.library.register_fake("shardgate_kernels::decode_linear")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("shardgate_kernels::packed_linear")
    def _(x, packed, n):
        return x.new_empty((*x.shape[:-1], n))

    _register_fake.done = True


def loaded() -> bool:
    """Whether this process loaded the kernels (then decode attention runs through them)."""
    return _loaded


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja`: the ninja wheel's binary, when ninja is not on PATH already."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))
