// C++ kernels for quanta's CPU path.
//
// paged_decode_attention: one query token per request against its KV blocks, read in place. The
// pure-torch path gathers every request's blocks into a padded tensor and runs batched matmuls, which
// moves the KV through memory three times; this kernel streams each K/V row once, straight from the
// paged cache, with the softmax in float32. Work is split over (request, kv head) pairs.
//
// rms_norm, rotary_inplace, silu_and_mul: one pass each instead of several torch ops (a decode step
// runs them ~100 times). Each rounds to the model dtype at the same points as the torch code it
// replaces, so results match it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 bfloat16 bit patterns -> float32: the bits move to the upper half (exact).
static inline __m512 bf16_bits_to_float(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// Row of D values to float32. The bfloat16 case is a 16-bit shift, written so the compiler vectorizes it.
template <typename scalar_t>
static inline void to_float(const scalar_t* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t D) {
  // Through memcpy, not a uint32_t* store: a type-punned store lets the optimizer move later float
  // reads of dst before it (strict aliasing), which it did in the prefill kernel.
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t d = 0; d < D; ++d) {
    const uint32_t u = static_cast<uint32_t>(bits[d]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    dst[d] = f;
  }
}

static inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// HD > 0 fixes the head size at compile time (unrolled, vectorized loops); HD == 0 reads it at run time.
template <typename scalar_t, int HD>
static void decode_kernel(
    const scalar_t* q,         // [nd, H, D], rows q_stride apart (a view of the fused qkv output)
    const scalar_t* k_cache,   // [NB, Hkv, bs, D]
    const scalar_t* v_cache,   // [NB, Hkv, bs, D]
    const int64_t* tables,     // [nd, max_blocks]
    const int64_t* ctx_lens,   // [nd]
    scalar_t* out,             // [nd, H, D]
    int64_t nd, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    int64_t max_blocks, float scale, int64_t q_stride) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = HD > 0 ? HD : head_dim;
  const int64_t total = nd * num_kv_heads;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), row(D), scores, sums(group);
    for (int64_t slot = begin; slot < end; ++slot) {
      // Threads get contiguous ranges, and requests often arrive sorted by length: zigzag the order
      // (0, last, 1, last-1, ...) so that every range mixes short and long contexts.
      const int64_t item = slot % 2 == 0 ? slot / 2 : total - 1 - slot / 2;
      const int64_t n = item / num_kv_heads, j = item % num_kv_heads;
      const int64_t len = ctx_lens[n];
      const int64_t* table = tables + n * max_blocks;
      to_float(q + n * q_stride + j * group * D, qf.data(), group * D);
      for (int64_t i = 0; i < group * D; ++i) qf[i] *= scale;
      scores.assign(group * len, 0.f);
      // Scores: every K row is converted to float once and used by the whole query group. Blocks are
      // walked in order, so a (block, head) piece of the cache is one contiguous run of rows.
      for (int64_t b = 0, t0 = 0; t0 < len; ++b, t0 += block_size) {
        const scalar_t* k = k_cache + (table[b] * num_kv_heads + j) * block_size * D;
        const int64_t rows = std::min(block_size, len - t0);
        for (int64_t r = 0; r < rows; ++r) {
          to_float(k + r * D, row.data(), D);
          for (int64_t g = 0; g < group; ++g) scores[g * len + t0 + r] = dot(qf.data() + g * D, row.data(), D);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        // Built with -ffast-math (vectorized exp): no infinities here, the max starts from a score.
        float m = sg[0];
        for (int64_t t = 1; t < len; ++t) m = sg[t] > m ? sg[t] : m;
        float total = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = std::exp(sg[t] - m);
          total += sg[t];
        }
        sums[g] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0, t0 = 0; t0 < len; ++b, t0 += block_size) {
        const scalar_t* v = v_cache + (table[b] * num_kv_heads + j) * block_size * D;
        const int64_t rows = std::min(block_size, len - t0);
        for (int64_t r = 0; r < rows; ++r) {
          to_float(v + r * D, row.data(), D);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t0 + r];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / sums[g];
        scalar_t* o = out + (n * num_heads + j * group + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 decode attention with AVX512-BF16, at the memory floor: the step's K and V are read once,
// 16 keys at a time (bs % 16 == 0, so a tile never crosses a block). Scores: each K row (raw bf16)
// meets the group's queries in vdpbf16ps (bf16 x bf16 products are exact in float32, sums in float32),
// and a 16-row transpose-add tree turns 16 rows' partial sums into one vector of 16 scores, instead of
// a horizontal reduction per (row, head). Softmax and the V accumulation are float32, as in
// decode_kernel above; only the float32 summation order differs.
namespace decode_bf16 {

// v[16] (row r's partial sums in slot (r % 4) * 4 + r / 4) -> lane r = sum of row r's 16 lanes.
static inline __m512 reduce16(const float* buf) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_load_ps(buf + 32 * i), b = _mm512_load_ps(buf + 32 * i + 16);
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

static inline int slot(int r) { return (r % 4) * 4 + r / 4; }

#ifndef PREFETCH_TILES
#define PREFETCH_TILES 2
#endif

static inline __m512 bf16x16_to_float(const uint16_t* p) {
  return bf16_bits_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Row r's share of prefetching a 16-row tile of HD bf16 values per row: HD / 32 of its cache lines.
template <int HD>
static inline void prefetch_share(const char* tile, int r) {
#pragma GCC unroll 4
  for (int i = 0; i < HD / 32; ++i) _mm_prefetch(tile + (r * (HD / 32) + i) * 64, _MM_HINT_T0);
}

template <int HD, int G>
static void kernel(
    const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* tables,
    const int64_t* ctx_lens, c10::BFloat16* out, int64_t nd, int64_t num_kv_heads, int64_t block_size,
    int64_t max_blocks, float scale, int64_t q_stride) {
  constexpr int QC = HD / 32, VC = HD / 16;  // 32 bf16 per q/k vector, 16 floats per v/acc vector
  const int64_t num_heads = num_kv_heads * G;
  // A work item is a request and a range of its kv heads: all of them when there are enough requests
  // to keep the threads busy, so that a tile of every head, one contiguous piece of the block, is read
  // in one go (the paged cache is [block, head, row, dim]); one head each otherwise.
  const int64_t split = nd >= 4 * at::get_num_threads() ? 1 : num_kv_heads;
  TORCH_CHECK(num_kv_heads % split == 0, "decode: head split");
  const int64_t heads_per_item = num_kv_heads / split, total = nd * split;
  // Items handed out one at a time, from the last request (the executor sorts decodes by context,
  // ascending: longest first), so the threads finish together even when one of them is slowed.
  std::atomic<int64_t> next_item{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf_store(G * 256 + 16), scores, accs;
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf_store.data()) + 63) & ~uintptr_t(63));
    for (int64_t it; (it = next_item.fetch_add(1)) < total;) {
      const int64_t item = total - 1 - it;
      const int64_t n = item / split, j0 = item % split * heads_per_item, nj = heads_per_item;
      const int64_t len = ctx_lens[n], padded = (len + 15) / 16 * 16, tiles = padded / 16;
      const int64_t* table = tables + n * max_blocks;
      // Tile t of heads j0 .. j0 + nj: nj * 16 rows, contiguous (bs % 16 == 0: a tile is in one block).
      auto tile = [&](const uint16_t* cache, int64_t t) {
        const int64_t t0 = 16 * t;
        return cache + ((table[t0 / block_size] * num_kv_heads + j0) * block_size + t0 % block_size) * HD;
      };
      const int64_t head_stride = block_size * HD;  // between heads within a block
      // The item reads its K tiles, then its V tiles: while reading tile i of that sequence, prefetch
      // tile i + PREFETCH_TILES (DRAM latency spans several tiles), a share per row read.
      const int64_t lines = nj * 16 * HD * 2 / 64;  // cache lines of one tile, all heads
      auto ahead = [&](int64_t i) {
        const int64_t a = std::min(i + PREFETCH_TILES, 2 * tiles - 1);
        return reinterpret_cast<const char*>(a < tiles ? tile(k_cache, a) : tile(v_cache, a - tiles));
      };
      scores.resize(nj * G * padded);
      const __m512 sc = _mm512_set1_ps(scale);
      for (int64_t t = 0; t < tiles; ++t) {
        const char* next = ahead(t);
        for (int64_t jj = 0; jj < nj; ++jj) {
          const uint16_t* k = tile(k_cache, t) + jj * head_stride;
          const uint16_t* qh = q + n * q_stride + (j0 + jj) * G * HD;
          __m512bh qv[G][QC];
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
            for (int c = 0; c < QC; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(qh + g * HD + 32 * c);
          // All 16 rows of the tile: rows past the context are in the block (finite, ignored below).
#pragma GCC unroll 16
          for (int r = 0; r < 16; ++r) {
            const int64_t line = (jj * 16 + r) * lines / (nj * 16);
            _mm_prefetch(next + 64 * line, _MM_HINT_T0);
            if (lines / (nj * 16) > 1) _mm_prefetch(next + 64 * (line + 1), _MM_HINT_T0);
            __m512bh kv[QC];
#pragma GCC unroll 4
            for (int c = 0; c < QC; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + r * HD + 32 * c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
              __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 4
              for (int c = 0; c < QC; ++c) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
              _mm512_store_ps(buf + g * 256 + 16 * slot(r), acc);
            }
          }
          for (int g = 0; g < G; ++g)
            _mm512_storeu_ps(scores.data() + (jj * G + g) * padded + 16 * t, _mm512_mul_ps(reduce16(buf + g * 256), sc));
        }
      }
      std::vector<float> inv(nj * G);
      for (int64_t h = 0; h < nj * G; ++h) {
        float* sg = scores.data() + h * padded;
        float m = sg[0];
        for (int64_t t = 1; t < len; ++t) m = sg[t] > m ? sg[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = std::exp(sg[t] - m);
          sum += sg[t];
        }
        inv[h] = 1.f / sum;
      }
      accs.assign(nj * G * HD, 0.f);
      const float* sp = scores.data();
      for (int64_t t = 0; t < tiles; ++t) {
        const char* next = ahead(tiles + t);
        const int rows = static_cast<int>(std::min<int64_t>(16, len - 16 * t));
        for (int64_t jj = 0; jj < nj; ++jj) {
          const uint16_t* v = tile(v_cache, t) + jj * head_stride;
          float* ah = accs.data() + jj * G * HD;
          __m512 acc[G][VC];
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
            for (int c = 0; c < VC; ++c) acc[g][c] = _mm512_loadu_ps(ah + g * HD + 16 * c);
          for (int r = 0; r < rows; ++r) {
            const int64_t line = (jj * 16 + r) * lines / (nj * 16);
            _mm_prefetch(next + 64 * line, _MM_HINT_T0);
            if (lines / (nj * 16) > 1) _mm_prefetch(next + 64 * (line + 1), _MM_HINT_T0);
            __m512 vf[VC];
#pragma GCC unroll 8
            for (int c = 0; c < VC; ++c) vf[c] = bf16x16_to_float(v + r * HD + 16 * c);
#pragma GCC unroll 8
            for (int g = 0; g < G; ++g) {
              const __m512 p = _mm512_set1_ps(sp[((jj * G) + g) * padded + 16 * t + r]);
#pragma GCC unroll 8
              for (int c = 0; c < VC; ++c) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
            }
          }
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
            for (int c = 0; c < VC; ++c) _mm512_storeu_ps(ah + g * HD + 16 * c, acc[g][c]);
        }
      }
      for (int64_t h = 0; h < nj * G; ++h) {
        c10::BFloat16* dst = out + (n * num_heads + j0 * G + h) * HD;
        for (int d = 0; d < HD; ++d) dst[d] = static_cast<c10::BFloat16>(accs[h * HD + d] * inv[h]);
      }
    }
  });
}

template <int HD>
static bool run_group(int64_t group, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const torch::Tensor& tables, const torch::Tensor& lens, torch::Tensor& out, float scale) {
  auto go = [&](auto kern) {
    kern(reinterpret_cast<const uint16_t*>(q.data_ptr()), reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
         reinterpret_cast<const uint16_t*>(v_cache.data_ptr()), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
         out.data_ptr<c10::BFloat16>(), q.size(0), k_cache.size(1), k_cache.size(2), tables.size(1), scale, q.stride(0));
    return true;
  };
  switch (group) {
    case 1: return go(kernel<HD, 1>);
    case 2: return go(kernel<HD, 2>);
    case 3: return go(kernel<HD, 3>);
    case 4: return go(kernel<HD, 4>);
    case 5: return go(kernel<HD, 5>);
    case 6: return go(kernel<HD, 6>);
    case 7: return go(kernel<HD, 7>);
    case 8: return go(kernel<HD, 8>);
    default: return false;
  }
}

// True if the bf16 path ran (bf16, head size 64 or 128, block size a multiple of 16, group <= 8).
static bool try_run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                    const torch::Tensor& tables, const torch::Tensor& lens, torch::Tensor& out, float scale) {
  if (q.scalar_type() != at::kBFloat16 || k_cache.size(2) % 16 != 0) return false;
  const int64_t group = q.size(1) / k_cache.size(1);
  if (q.size(2) == 64) return run_group<64>(group, q, k_cache, v_cache, tables, lens, out, scale);
  if (q.size(2) == 128) return run_group<128>(group, q, k_cache, v_cache, tables, lens, out, scale);
  return false;
}

}  // namespace decode_bf16
#endif

// q: [nd, H, D] with contiguous heads (rows may be strided: a view of the qkv projection). `out`, if
// given, receives the result (e.g. the first rows of the layer's attention output), saving a copy.
torch::Tensor paged_decode_attention(
    torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
    torch::Tensor context_lens, double scale, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && block_tables.dim() == 2, "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q: heads must be contiguous within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong, "int64 tables");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(), "dtypes differ");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = out_opt.has_value() ? *out_opt : torch::empty(q.sizes(), q.options());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "out: contiguous, q's shape");
  const int64_t nd = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes do not match");
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (decode_bf16::try_run(q, k_cache, v_cache, tables, lens, out, static_cast<float>(scale))) return out;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
             tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), nd, num_heads,
             num_kv_heads, head_dim, block_size, tables.size(1), static_cast<float>(scale), q.stride(0));
    };
    if (head_dim == 64) run(decode_kernel<scalar_t, 64>);
    else if (head_dim == 128) run(decode_kernel<scalar_t, 128>);
    else run(decode_kernel<scalar_t, 0>);
  });
  return out;
}

// ---- paged_prefill_attention ------------------------------------------------------------------------
// Prefill chunks (causal, with any earlier context) straight from the paged cache, flash style: a work
// item is (chunk, kv head, tile of QT query positions); its rows are the tile's positions times the
// query heads sharing that kv head, so GQA reads each K/V row once for the whole group, with no copy.
// Keys are walked in tiles of KT, converted to float32 once per item (K transposed, so one row's KT
// scores are one vector), with an online softmax and all accumulation in float32.
namespace prefill {

constexpr int KT = 16;  // keys per tile: one 16-float vector of scores per row
constexpr int QT = 8;   // query positions per work item (x group rows; 24 for 9 heads over 3)

// GCC/Clang vector extension: AVX-512 gives one register, narrower targets split it.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

// s[r][0..KT) = q[r] . kt[:, 0..KT) for NR rows; kt is [D][KT].
template <int NR, int HD>
static inline void scores(const float* q, const float* kt, float* s, int64_t head_dim) {
  const int64_t D = HD > 0 ? HD : head_dim;
  v16 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = v16{};
  for (int64_t d = 0; d < D; ++d) {
    const v16 k = load(kt + d * KT);
    for (int r = 0; r < NR; ++r) acc[r] += q[r * D + d] * k;
  }
  for (int r = 0; r < NR; ++r) store(s + r * KT, acc[r]);
}

// o[r] += sum_j p[r][j] * vf[j] for NR rows over nk keys; vf is [KT][D], o is [NR][D].
template <int NR, int HD>
static inline void accumulate(const float* p, const float* vf, float* o, int nk, int64_t head_dim) {
  const int64_t D = HD > 0 ? HD : head_dim;
  for (int64_t d0 = 0; d0 + 16 <= D; d0 += 16) {
    v16 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = load(o + r * D + d0);
    for (int j = 0; j < nk; ++j) {
      const v16 v = load(vf + j * D + d0);
      for (int r = 0; r < NR; ++r) acc[r] += p[r * KT + j] * v;
    }
    for (int r = 0; r < NR; ++r) store(o + r * D + d0, acc[r]);
  }
  for (int64_t d = D - D % 16; d < D; ++d)  // head sizes that are not a multiple of 16
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < nk; ++j) o[r * D + d] += p[r * KT + j] * vf[j * D + d];
}

template <int HD>
static void scores_rows(const float* q, const float* kt, float* s, int64_t rows, int64_t D) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) scores<8, HD>(q + r * D, kt, s + r * KT, D);
  for (; r + 4 <= rows; r += 4) scores<4, HD>(q + r * D, kt, s + r * KT, D);
  for (; r < rows; ++r) scores<1, HD>(q + r * D, kt, s + r * KT, D);
}

template <int HD>
static void accumulate_rows(const float* p, const float* vf, float* o, int64_t rows, int nk, int64_t D) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) accumulate<8, HD>(p + r * KT, vf, o + r * D, nk, D);
  for (; r + 4 <= rows; r += 4) accumulate<4, HD>(p + r * KT, vf, o + r * D, nk, D);
  for (; r < rows; ++r) accumulate<1, HD>(p + r * KT, vf, o + r * D, nk, D);
}

struct Item {
  int64_t chunk, head, q0, cost;
};

template <typename scalar_t, int HD>
static void kernel(
    const scalar_t* q, int64_t q_stride,   // [T, H, D], rows q_stride apart
    const scalar_t* k_cache, const scalar_t* v_cache,  // [NB, Hkv, bs, D]
    const int64_t* tables, int64_t max_blocks,         // [C, max_blocks]
    const int64_t* info,                               // [C, 3]: first row, new tokens, context length
    int64_t num_chunks, scalar_t* out,                 // [T, H, D] contiguous
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = HD > 0 ? HD : head_dim;
  std::vector<Item> items;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t n = info[c * 3 + 1], offset = info[c * 3 + 2] - n;
    for (int64_t q0 = 0; q0 < n; q0 += QT)
      for (int64_t j = 0; j < num_kv_heads; ++j)
        items.push_back({c, j, q0, offset + std::min(q0 + QT, n)});  // keys the item reads
  }
  // Longest first, handed out one at a time: the threads finish together.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t R = QT * group;
    std::vector<float> qf(R * D), acc(R * D), kt(D * KT), vf(KT * D), s(R * KT), m(R), l(R);
    for (int64_t i; (i = next.fetch_add(1)) < num_items;) {
      const Item& it = items[i];
      const int64_t first_row = info[it.chunk * 3], n = info[it.chunk * 3 + 1];
      const int64_t offset = info[it.chunk * 3 + 2] - n;  // position of the chunk's first query
      const int64_t nq = std::min<int64_t>(QT, n - it.q0), rows = nq * group;
      const int64_t* table = tables + it.chunk * max_blocks;
      // Row r = query position (r / group) of the tile, head (j * group + r % group): contiguous in q.
      for (int64_t t = 0; t < nq; ++t) {
        float* dst = qf.data() + t * group * D;
        to_float(q + (first_row + it.q0 + t) * q_stride + it.head * group * D, dst, group * D);
        for (int64_t x = 0; x < group * D; ++x) dst[x] *= scale;
      }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      std::fill(m.begin(), m.begin() + rows, -1e30f);  // finite: built with -ffast-math
      std::fill(l.begin(), l.begin() + rows, 0.f);
      const int64_t last_pos = offset + it.q0 + nq - 1;
      for (int64_t t0 = 0; t0 <= last_pos; t0 += KT) {
        const int nk = static_cast<int>(std::min<int64_t>(KT, last_pos + 1 - t0));
        for (int j = 0; j < nk; ++j) {
          const int64_t pos = t0 + j;
          const int64_t base = ((table[pos / block_size] * num_kv_heads + it.head) * block_size + pos % block_size) * D;
          float* vrow = vf.data() + j * D;
          to_float(k_cache + base, vrow, D);  // K row, staged in vf, then transposed into kt
          for (int64_t d = 0; d < D; ++d) kt[d * KT + j] = vrow[d];
          to_float(v_cache + base, vrow, D);
        }
        for (int j = nk; j < KT; ++j)
          for (int64_t d = 0; d < D; ++d) kt[d * KT + j] = 0.f;
        scores_rows<HD>(qf.data(), kt.data(), s.data(), rows, D);
        for (int64_t r = 0; r < rows; ++r) {
          // Causal: row r sees keys up to its own position.
          const int64_t visible = std::min<int64_t>(nk, offset + it.q0 + r / group - t0 + 1);
          float* sr = s.data() + r * KT;
          float mx = m[r];
          for (int j = 0; j < visible; ++j) mx = sr[j] > mx ? sr[j] : mx;
          const float alpha = std::exp(m[r] - mx);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < KT; ++j) {
            const float p = j < visible ? std::exp(sr[j] - mx) : 0.f;
            sr[j] = p;
            sum += p;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
          if (alpha != 1.f) {
            float* a = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
        }
        accumulate_rows<HD>(s.data(), vf.data(), acc.data(), rows, nk, D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / l[r];
        scalar_t* o = out + ((first_row + it.q0 + r / group) * num_heads + it.head * group + r % group) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
      }
    }
  });
}

}  // namespace prefill

// q: [T, H, D] with contiguous heads (rows may be strided, a view of qkv); chunk c's queries are rows
// info[c, 0] .. info[c, 0] + info[c, 1], at positions context_len - new tokens .. context_len - 1 of the
// sequence whose blocks are block_tables[c]; their KV must be in the cache already (write_kv first).
// Writes those rows of `out` ([T, H, D], contiguous); other rows are left untouched.
void paged_prefill_attention(
    torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
    torch::Tensor chunk_info, double scale, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && block_tables.dim() == 2, "prefill: bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "prefill: q heads must be contiguous within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(), "prefill: caches");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && chunk_info.scalar_type() == torch::kLong, "prefill: int64 tables");
  TORCH_CHECK(chunk_info.dim() == 2 && chunk_info.size(1) == 3 && chunk_info.size(0) == block_tables.size(0), "prefill: info [C, 3]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(), "prefill: dtypes differ");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "prefill: out");
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "prefill: head shapes do not match");
  auto tables = block_tables.contiguous();
  auto info = chunk_info.contiguous();
  const int64_t* ip = info.data_ptr<int64_t>();
  for (int64_t c = 0; c < info.size(0); ++c) {
    const int64_t first = ip[c * 3], n = ip[c * 3 + 1], ctx = ip[c * 3 + 2];
    TORCH_CHECK(n >= 1 && n <= ctx && first >= 0 && first + n <= q.size(0), "prefill: chunk out of range");
    TORCH_CHECK((ctx + block_size - 1) / block_size <= tables.size(1), "prefill: block table too short");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill_attention", [&] {
    auto run = [&](auto kern) {
      kern(q.data_ptr<scalar_t>(), q.stride(0), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
           tables.data_ptr<int64_t>(), tables.size(1), ip, info.size(0), out.data_ptr<scalar_t>(), num_heads,
           num_kv_heads, head_dim, block_size, static_cast<float>(scale));
    };
    if (head_dim == 64) run(prefill::kernel<scalar_t, 64>);
    else if (head_dim == 128) run(prefill::kernel<scalar_t, 128>);
    else run(prefill::kernel<scalar_t, 0>);
  });
}

// The step's new K and V rows into the paged caches [NB, Hkv, bs, D]: token t goes to slot slots[t]
// (block * bs + offset). k, v: [T, Hkv, D] with contiguous heads, rows possibly strided (views of the
// qkv projection). One call for both caches instead of two index_copy_ calls on precomputed rows.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 4, "write_kv: bad shapes");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "write_kv: heads must be contiguous within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(), "write_kv: caches");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.size(0) == k.size(0), "write_kv: slots");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(), "write_kv: dtypes");
  const int64_t t = k.size(0), hkv = k.size(1), d = k.size(2), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == hkv && k_cache.size(3) == d, "write_kv: cache shape");
  const int64_t ks = k.stride(0), vs = v.stride(0), bytes = d * k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t es = k.element_size();
  at::parallel_for(0, t, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t block = sp[r] / bs, offset = sp[r] % bs;
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t dst = ((block * hkv + h) * bs + offset) * d * es;
        std::memcpy(kc + dst, kp + (r * ks + h * d) * es, bytes);
        std::memcpy(vc + dst, vp + (r * vs + h * d) * es, bytes);
      }
    }
  });
}

template <typename scalar_t>
static inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// One row of RMSNorm: out = weight * (row / rms(row)), `row` in float32 (the input's values).
template <typename scalar_t>
static inline void rms_norm_row(const float* row, const scalar_t* wp, scalar_t* op, int64_t h, double eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < h; ++i) ss += row[i] * row[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
  for (int64_t i = 0; i < h; ++i)
    op[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * round_to<scalar_t>(row[i] * inv));
}

// weight * (x / rms(x)) with the normalization in float32, as transformers' RMSNorm.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous [T, H]");
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(h);
      for (int64_t r = begin; r < end; ++r) {
        to_float(xp + r * h, row.data(), h);
        rms_norm_row(row.data(), wp, op + r * h, h, eps);
      }
    });
  });
  return out;
}

// (x + y, rms_norm(x + y)) in one pass: the residual add rounded to the model's dtype, as torch's add
// does, then the same norm as rms_norm on that sum.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight,
                                                      double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && y.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous [T, H]");
  TORCH_CHECK(x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(), "add_rms_norm: x and y differ");
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(h);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < h; ++i) {
          const scalar_t v = static_cast<scalar_t>(static_cast<float>(xp[r * h + i]) + static_cast<float>(yp[r * h + i]));
          sp[r * h + i] = v;
          row[i] = static_cast<float>(v);
        }
        rms_norm_row(row.data(), wp, op + r * h, h, eps);
      }
    });
  });
  return {sum, out};
}

// q*cos + rotate_half(q)*sin for q [T, H, D] and k [T, Hkv, D] in place; cos, sin: [T, D]. q and k need
// contiguous heads only: their rows may be strided, as views of the fused qkv projection are.
void rotary_inplace(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k.stride(2) == 1 && k.stride(1) == k.size(2),
              "rotary: heads must be contiguous within a row");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "rotary: contiguous tables");
  const int64_t t = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2), half = d / 2;
  const int64_t qs = q.stride(0), ks = k.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_inplace", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, t, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> x(d);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* c = cp + r * d;
        const scalar_t* s = sp + r * d;
        for (int64_t head = 0; head < hq + hk; ++head) {
          scalar_t* v = head < hq ? qp + r * qs + head * d : kp + r * ks + (head - hq) * d;
          to_float(v, x.data(), d);
          for (int64_t i = 0; i < d; ++i) {
            const float rot = i < half ? -x[i + half] : x[i - half];
            const float a = round_to<scalar_t>(x[i] * static_cast<float>(c[i]));
            const float b = round_to<scalar_t>(rot * static_cast<float>(s[i]));
            v[i] = static_cast<scalar_t>(a + b);
          }
        }
      }
    });
  });
}

#if defined(__AVX512F__)
// exp(x) for 16 floats, |error| within 2 ulp of the exact value (x above 88 is not expected: callers cap
// it). Range reduction x = n ln2 + r with |r| <= ln2 / 2 and a degree-6 polynomial for exp(r), the
// scheme of Cephes' expf; std::exp, one element at a time, cost more than the matmul beside it.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));  // below this exp is 0 in float; keeps n in range
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// float32 -> bfloat16 bits, round to nearest even (no NaNs here), as static_cast<c10::BFloat16> does.
static inline __m256i float16_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

static inline __m512 bf16_round(__m512 x) {
  return bf16_bits_to_float(float16_to_bf16(x));
}

// One row of the bfloat16 case: silu rounded to bfloat16 before the product, as the scalar code.
static void silu_and_mul_bf16_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = bf16_bits_to_float(_mm256_maskz_loadu_epi16(m, gate + i));
    const __m512 u = bf16_bits_to_float(_mm256_maskz_loadu_epi16(m, up + i));
    // exp(-g) stays finite up to -g = 87.3 (-ffast-math assumes no infinities); below that gate silu is
    // -0 (what g / inf gives), off by under 1e-36 from the exact value.
    const __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(87.3f)));
    // The rounding-mode form of the division: -ffast-math would otherwise turn g / d into g * (1 / d),
    // two roundings, which moved silu across a bfloat16 rounding boundary for some inputs.
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
    __m512 silu = _mm512_div_round_ps(g, d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    silu = bf16_round(_mm512_mask_mov_ps(silu, _mm512_cmp_ps_mask(g, _mm512_set1_ps(-87.3f), _CMP_LT_OQ),
                                         _mm512_set1_ps(-0.f)));
    _mm256_mask_storeu_epi16(out + i, m, float16_to_bf16(_mm512_mul_ps(silu, u)));
  }
}
#endif

// silu(gate) * up for gate_up [T, 2I] -> [T, I].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous(), "silu_and_mul: contiguous [T, 2I]");
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({t, inter}, gate_up.options());
#if defined(__AVX512F__)
  if (gate_up.scalar_type() == torch::kBFloat16) {
    const uint16_t* gp = reinterpret_cast<const uint16_t*>(gate_up.data_ptr());
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, t, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        silu_and_mul_bf16_row(gp + r * 2 * inter, gp + r * 2 * inter + inter, op + r * inter, inter);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> g(inter), u(inter);
      for (int64_t r = begin; r < end; ++r) {
        to_float(gp + r * 2 * inter, g.data(), inter);
        to_float(gp + r * 2 * inter + inter, u.data(), inter);
        for (int64_t i = 0; i < inter; ++i) {
          // exp's argument is capped: built with -ffast-math, infinities must not appear. Below the cap
          // silu is -0 (what g / inf gives), as in the bfloat16 path.
          const float exact = g[i] / (1.f + std::exp(std::min(-g[i], 87.3f)));
          const float silu = round_to<scalar_t>(g[i] < -87.3f ? -0.f : exact);
          op[r * inter + i] = static_cast<scalar_t>(silu * u[i]);
        }
      }
    });
  });
  return out;
}

// Index of the first maximum of each row of a float32 [R, V] tensor (greedy sampling): a max pass and a
// find pass, both vectorized, instead of ATen's scalar index-tracking reduction (10x slower here).
// NaN-free input assumed (logits); torch.argmax would rank a NaN highest.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "argmax_rows: contiguous float32 [R, V]");
  const int64_t rows = x.size(0), v = x.size(1);
  auto out = torch::empty({rows}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * v;
      float m = row[0];
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 mv = _mm512_set1_ps(row[0]);
      for (; i + 16 <= v; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(row + i));
      m = _mm512_reduce_max_ps(mv);
#endif
      for (; i < v; ++i) m = row[i] > m ? row[i] : m;
      int64_t at = 0;
#if defined(__AVX512F__)
      const __m512 target = _mm512_set1_ps(m);
      for (; at + 16 <= v; at += 16) {
        const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_loadu_ps(row + at), target);
        if (hit) break;
      }
#endif
      while (at < v - 1 && row[at] != m) ++at;
      op[r] = at;
    }
  });
  return out;
}

// amx_linear.cpp
bool amx_available();
torch::Tensor amx_pack(const torch::Tensor& weight);
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                         const c10::optional<torch::Tensor>& bias);
// avx512_linear.cpp
bool avx512_bf16_linear_available();
torch::Tensor avx512_bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                                 const c10::optional<torch::Tensor>& bias, int64_t k_chain);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &amx_available, "AMX bf16 linears built and granted by the OS");
  m.def("amx_pack", &amx_pack, "[N, K] bf16 weight into AMX tile order");
  m.def("amx_linear", &amx_linear, "x @ W^T (+ bias) with W from amx_pack", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none());
  m.def("avx512_bf16_linear_available", &avx512_bf16_linear_available, "AVX512-BF16 linears built");
  m.def("avx512_bf16_linear", &avx512_bf16_linear, "x @ W^T (+ bias) with W from amx_pack, on AVX512-BF16",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("k_chain") = 0);
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum (float32)");
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = py::none());
  m.def("paged_prefill_attention", &paged_prefill_attention, "paged causal prefill attention (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("chunk_info"),
        py::arg("scale"), py::arg("out"));
  m.def("write_kv", &write_kv, "new K/V rows into the paged caches");
  // q and k may be views into the fused qkv output (as with the Triton kernels).
  m.attr("ROTARY_TAKES_STRIDES") = true;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  m.attr("DECODE_BF16_VECTOR") = true;  // bf16 decode attention has the AVX512-BF16 path (tests report it)
#else
  m.attr("DECODE_BF16_VECTOR") = false;
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm, float32 inside");
  m.def("add_rms_norm", &add_rms_norm, "(x + y, RMSNorm(x + y)) in one pass");
  m.def("rotary_inplace", &rotary_inplace, "rotate-half rotary embedding, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
}
