// bfloat16 linear layers on Intel AMX for the small batches of decode steps.
//
// A decode step multiplies a few rows by every weight of the model once, so its linears are bound by
// how fast the weights stream from memory. oneDNN's prepacked matmul reads them at well under the
// memory bandwidth at these sizes; this kernel reads each weight tile exactly once, in one sequential
// stream per thread, straight into AMX tile registers, with the activations (a few KB) staying in L1.
//
// Weights are packed once at load time into the tile layout TDPBF16PS consumes ("VNNI": pairs of
// consecutive k for 16 output columns per 64-byte row). Packed order: groups of 32 output columns; per
// group, per 32-wide k block, two 1 KB tiles (columns 0-15, 16-31). A thread walks its groups in order,
// so its reads are one contiguous stream. Accumulation is float32 and the output is rounded to bfloat16
// once (round to nearest even), as oneDNN does.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define QUANTA_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kGroupCols = 32;  // output columns per packed group: two 16-column tiles
constexpr int64_t kBlockK = 32;     // k per tile: 16 rows of bf16 pairs

#if defined(QUANTA_AMX)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux gives a process AMX state only on request (once; it then holds for every thread).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0-3: accumulators C[a][b] = tile 2a+b (row block a, column tile b); 4, 5: activation row blocks;
// 6, 7: the two weight tiles of a k block. Every tile is 16 rows of 64 bytes.
void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One group (32 columns) for one or two 16-row blocks of activations; accumulators stored to `acc`
// as [row block][column tile][16][16] float32.
template <bool kTwoBlocks>
inline void group_tiles(const uint16_t* a0, int64_t s0, const uint16_t* a1, int64_t s1, const uint16_t* w,
                        int64_t kblocks, float* acc) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoBlocks) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* wk = w + kb * 2 * 512;
    // Tile loads stall until their data arrives and do not overlap the multiplies here, so the weight
    // stream is prefetched 4 KB ahead (measured best; 1.3-1.6x at decode sizes). Past the end of the
    // weights a prefetch is harmless.
    const char* ahead = reinterpret_cast<const char*>(wk) + 4096;
    for (int line = 0; line < 32; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    _tile_loadd(6, wk, 64);
    _tile_loadd(7, wk + 512, 64);
    _tile_loadd(4, a0 + kb * kBlockK, s0);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoBlocks) {
      _tile_loadd(5, a1 + kb * kBlockK, s1);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 64);
  _tile_stored(1, acc + 256, 64);
  if (kTwoBlocks) {
    _tile_stored(2, acc + 512, 64);
    _tile_stored(3, acc + 768, 64);
  }
}

// Rows [m0, m0 + rows) of the output from accumulators of one row block: bias, then one rounding.
inline void store_rows(const float* acc, int64_t rows, int64_t m0, int64_t n0, int64_t n, const float* bias,
                       uint16_t* out, int64_t out_stride) {
  const int64_t cols = std::min<int64_t>(kGroupCols, n - n0);
  const __mmask16 lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + n0 + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* o = out + (m0 + r) * out_stride + n0;
    const __m512 c0 = _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b0);
    const __m512 c1 = _mm512_add_ps(_mm512_loadu_ps(acc + 256 + r * 16), b1);
    _mm256_mask_storeu_epi16(o, lo, (__m256i)_mm512_cvtneps_pbh(c0));
    if (hi) _mm256_mask_storeu_epi16(o + 16, hi, (__m256i)_mm512_cvtneps_pbh(c1));
  }
}

#endif  // QUANTA_AMX

}  // namespace

bool amx_available() {
#if defined(QUANTA_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// [N, K] weight -> packed [ceil(N/32), K/32, 2, 16, 16, 2] (columns past N are zeros).
torch::Tensor amx_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "amx_pack: [N, K] bfloat16");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % kBlockK == 0, "amx_pack: in_features must be a multiple of 32");
  const int64_t groups = (n + kGroupCols - 1) / kGroupCols;
  auto w = weight.contiguous();
  auto packed = torch::zeros({groups * kGroupCols * k}, weight.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t kb = 0; kb < k / kBlockK; ++kb)
        for (int64_t t = 0; t < 2; ++t) {
          uint16_t* tile = dst + ((g * (k / kBlockK) + kb) * 2 + t) * 512;
          for (int64_t c = 0; c < 16; ++c) {
            const int64_t col = g * kGroupCols + t * 16 + c;
            if (col >= n) continue;
            const uint16_t* row = src + col * k + kb * kBlockK;
            for (int64_t p = 0; p < 16; ++p) {
              tile[p * 32 + c * 2] = row[2 * p];
              tile[p * 32 + c * 2 + 1] = row[2 * p + 1];
            }
          }
        }
  });
  return packed;
}

// y[M, N] = x[M, K] @ W^T (+ bias), W packed by amx_pack. x rows may be strided (last dim contiguous).
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                         const c10::optional<torch::Tensor>& bias) {
#if defined(QUANTA_AMX)
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16,
              "amx_linear: bfloat16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "amx_linear: x must be [M, K] with contiguous rows");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kBlockK == 0, "amx_linear: K must be a multiple of 32");
  const int64_t groups = (n + kGroupCols - 1) / kGroupCols;
  TORCH_CHECK(packed.numel() == groups * kGroupCols * k, "amx_linear: packed weight does not match K, N");
  TORCH_CHECK(amx_permitted(), "amx_linear: the OS did not grant AMX state");
  auto out = torch::empty({m, n}, x.options());
  if (m == 0) return out;
  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(torch::kFloat).contiguous();
  const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;

  // The last partial block of 16 rows is read from a zero-padded copy: a tile load reads 16 rows.
  const int64_t full = m / 16, tail = m % 16, blocks = full + (tail ? 1 : 0);
  const int64_t x_stride = x.stride(0);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<uint16_t> pad(tail ? 16 * k : 0, 0);
  for (int64_t r = 0; r < tail; ++r)
    std::memcpy(pad.data() + r * k, xp + (full * 16 + r) * x_stride, k * sizeof(uint16_t));
  const uint16_t* padp = pad.data();
  auto block_ptr = [&](int64_t b, int64_t& stride) -> const uint16_t* {
    if (b < full) {
      stride = x_stride * 2;
      return xp + b * 16 * x_stride;
    }
    stride = k * 2;
    return padp;
  };
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t kblocks = k / kBlockK;

  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    load_tile_config();
    alignas(64) float acc[4 * 256];
    for (int64_t g = g0; g < g1; ++g) {
      const uint16_t* w = wp + g * kGroupCols * k;
      for (int64_t b = 0; b < blocks; b += 2) {
        int64_t s0 = 0, s1 = 0;
        const uint16_t* a0 = block_ptr(b, s0);
        const int64_t rows0 = b < full ? 16 : tail;
        if (b + 1 < blocks) {
          const uint16_t* a1 = block_ptr(b + 1, s1);
          group_tiles<true>(a0, s0, a1, s1, w, kblocks, acc);
          store_rows(acc, rows0, b * 16, g * kGroupCols, n, bias_p, op, n);
          store_rows(acc + 512, b + 1 < full ? 16 : tail, (b + 1) * 16, g * kGroupCols, n, bias_p, op, n);
        } else {
          group_tiles<false>(a0, s0, nullptr, 0, w, kblocks, acc);
          store_rows(acc, rows0, b * 16, g * kGroupCols, n, bias_p, op, n);
        }
      }
    }
    _tile_release();
  });
  return out;
#else
  TORCH_CHECK(false, "amx_linear: built without AMX support");
#endif
}
