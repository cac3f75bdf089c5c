// bfloat16 linear layers with AVX512-BF16 (VDPBF16PS), for CPUs that have it but no AMX (AMD Zen 4/5,
// Intel Cooper Lake).
//
// The weights use amx_pack's layout: per group of 32 output columns, per block of 32 k, two 1 KB tiles
// whose 64-byte row p holds the k pair (2p, 2p + 1) of 16 columns. That row is exactly one VDPBF16PS
// operand: 16 float32 lanes, each a column's pair. A row of activations contributes its pair as a
// broadcast 32-bit value, so a micro-tile of up to 6 rows x 64 columns keeps 24 accumulators in registers
// and reads each weight vector once per row block.
//
// Why not oneDNN: at decode sizes (1-96 rows) its prepacked matmul streams the weights more slowly (a
// decode step reads every weight of the model) and loses a fixed cost per call. Here each thread walks
// its column groups in one sequential stream, the next unit prefetched while this one computes.
// Accumulation is float32 in k order within chains of `k_chain` k whose sums are then added in order (as
// oneDNN does: the caller passes the chain length that reproduces F.linear), then the bias, then one
// rounding to bfloat16 (round to nearest even).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define QUANTA_AVX512_BF16 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroupCols = 32;  // as amx_pack
constexpr int64_t kBlockK = 32;
constexpr int kRows = 6;            // rows per micro-tile: 6 x 4 accumulators + 4 weights + 1 broadcast
constexpr int64_t kRowChunk = 192;  // rows whose activations stay in L2 while a thread walks its groups

#if defined(QUANTA_AVX512_BF16)

// Rows [0, R) x groups [g, g + G) of the output. `w` is group g's packed weights; `group` the elements of
// one packed group (32 * K). `ahead`: prefetch this stream 4 KB ahead (nothing has fetched it yet); `pf`,
// `pf_lines`: lines of the next unit to prefetch, spread over the k blocks, so that DRAM keeps streaming
// while the later row blocks compute from cache.
template <int R, int G>
inline void micro_tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t group, int64_t kblocks,
                       int64_t chain, bool ahead, const char* pf, int64_t pf_lines,
                       const float* bias, int64_t n0, int64_t n, uint16_t* out, int64_t out_stride) {
  // Chains of `chain` k blocks: each sums from zero in registers, then adds into the total (in L1).
  __m512 acc[R][2 * G];
  alignas(64) float total[R][2 * G][16];
  const int64_t per_kb = (pf_lines + kblocks - 1) / kblocks;
  // (A countdown: with kb % chain, two integer divisions per k block, 48 rows ran about 1.3x slower.)
  for (int64_t kb = 0, left = chain; kb < kblocks; ++kb) {
    if (left == chain) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * G; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    const uint16_t* wk = w + kb * 2 * 512;
    if (ahead) {
      const char* a = reinterpret_cast<const char*>(wk) + 4096;  // past the end a prefetch is harmless
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g)
#pragma GCC unroll 32
        for (int line = 0; line < 32; ++line) _mm_prefetch(a + g * group * 2 + line * 64, _MM_HINT_T0);
    }
    for (int64_t i = kb * per_kb, e = std::min(pf_lines, i + per_kb); i < e; ++i)
      _mm_prefetch(pf + i * 64, _MM_HINT_T0);
    const uint16_t* xk = x + kb * kBlockK;
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      __m512bh wv[2 * G];
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        wv[2 * g] = (__m512bh)_mm512_loadu_si512(wk + g * group + p * 32);
        wv[2 * g + 1] = (__m512bh)_mm512_loadu_si512(wk + g * group + 512 + p * 32);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        __builtin_memcpy(&pair, xk + r * x_stride + 2 * p, sizeof(pair));
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < 2 * G; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, wv[v]);
      }
    }
    if (--left == 0 || kb == kblocks - 1) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * G; ++v)
          _mm512_store_ps(total[r][v], kb < chain ? acc[r][v] : _mm512_add_ps(_mm512_load_ps(total[r][v]), acc[r][v]));
      left = chain;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < 2 * G; ++v) {
    const int64_t c0 = n0 + 16 * v;
    if (c0 >= n) break;
    const __mmask16 mask = n - c0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - c0)) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(out + r * out_stride + c0, mask,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(total[r][v]), b)));
  }
}

template <int G, typename... Args>
inline void tile_rows(int rows, Args... args) {
  switch (rows) {
    case 6: return micro_tile<6, G>(args...);
    case 5: return micro_tile<5, G>(args...);
    case 4: return micro_tile<4, G>(args...);
    case 3: return micro_tile<3, G>(args...);
    case 2: return micro_tile<2, G>(args...);
    default: return micro_tile<1, G>(args...);
  }
}

#endif  // QUANTA_AVX512_BF16

}  // namespace

bool avx512_bf16_linear_available() {
#if defined(QUANTA_AVX512_BF16)
  return true;
#else
  return false;
#endif
}

// y[M, N] = x[M, K] @ W^T (+ bias), W packed by amx_pack. x rows may be strided (last dim contiguous).
torch::Tensor avx512_bf16_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                                 const c10::optional<torch::Tensor>& bias, int64_t k_chain) {
#if defined(QUANTA_AVX512_BF16)
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16,
              "avx512_bf16_linear: bfloat16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "avx512_bf16_linear: x must be [M, K] with contiguous rows");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kBlockK == 0, "avx512_bf16_linear: K must be a multiple of 32");
  const int64_t groups = (n + kGroupCols - 1) / kGroupCols;
  TORCH_CHECK(packed.numel() == groups * kGroupCols * k, "avx512_bf16_linear: packed weight does not match K, N");
  auto out = torch::empty({m, n}, x.options());
  if (m == 0) return out;
  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(torch::kFloat).contiguous();
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t xs = x.stride(0), group = kGroupCols * k, kblocks = k / kBlockK;
  TORCH_CHECK(k_chain >= 0 && k_chain % kBlockK == 0, "avx512_bf16_linear: k_chain must be a multiple of 32");
  const int64_t chain = k_chain == 0 ? kblocks : k_chain / kBlockK;

  // Threads split the column groups (each its own contiguous weight stream), walked two at a time (a
  // unit). Rows go in chunks whose activations stay in cache while the thread's units pass.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < m; m0 += kRowChunk) {
      const int64_t m1 = std::min(m, m0 + kRowChunk);
      const int64_t passes = (m1 - m0 + kRows - 1) / kRows;
      for (int64_t g = g0; g < g1; g += 2) {
        const int64_t width = std::min<int64_t>(2, g1 - g);
        const uint16_t* w = wp + g * group;
        // The next unit's lines, a share per row block. Only when the weights pass once: with several row
        // chunks they come from cache the second time.
        const int64_t next_g = g + 2;
        const int64_t next_lines =
            m > kRowChunk || next_g >= g1 ? 0 : std::min<int64_t>(2, g1 - next_g) * group * 2 / 64;
        const int64_t share = (next_lines + passes - 1) / passes;
        const char* next = reinterpret_cast<const char*>(wp + next_g * group);
        for (int64_t r = m0, i = 0; r < m1; r += kRows, ++i) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, m1 - r));
          // Nothing prefetched this unit: the thread's first, or any when units do not prefetch the next.
          const bool ahead = r == m0 && (g == g0 || m > kRowChunk);
          const int64_t lo = std::min(i * share, next_lines), hi = std::min(lo + share, next_lines);
          auto args = std::make_tuple(xp + r * xs, xs, w, group, kblocks, chain, ahead, next + lo * 64, hi - lo, bias_p,
                                      g * kGroupCols, n, op + r * n, n);
          if (width == 2)
            std::apply([&](auto... a) { tile_rows<2>(rows, a...); }, args);
          else
            std::apply([&](auto... a) { tile_rows<1>(rows, a...); }, args);
        }
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "avx512_bf16_linear: built without AVX512-BF16 support");
#endif
}
