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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Row of D values to float32. The bfloat16 case is a 16-bit shift, written so the compiler vectorizes it.
template <typename scalar_t>
static inline void to_float(const scalar_t* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t D) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
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
        float ss = 0.f;
        for (int64_t i = 0; i < h; ++i) ss += row[i] * row[i];
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
        for (int64_t i = 0; i < h; ++i)
          op[r * h + i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * round_to<scalar_t>(row[i] * inv));
      }
    });
  });
  return out;
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

// silu(gate) * up for gate_up [T, 2I] -> [T, I].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous(), "silu_and_mul: contiguous [T, 2I]");
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({t, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> g(inter), u(inter);
      for (int64_t r = begin; r < end; ++r) {
        to_float(gp + r * 2 * inter, g.data(), inter);
        to_float(gp + r * 2 * inter + inter, u.data(), inter);
        for (int64_t i = 0; i < inter; ++i) {
          // exp's argument is capped: built with -ffast-math, infinities must not appear.
          const float silu = round_to<scalar_t>(g[i] / (1.f + std::exp(std::min(-g[i], 80.f))));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum (float32)");
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = py::none());
  m.def("write_kv", &write_kv, "new K/V rows into the paged caches");
  // q and k may be views into the fused qkv output (as with the Triton kernels).
  m.attr("ROTARY_TAKES_STRIDES") = true;
  m.def("rms_norm", &rms_norm, "RMSNorm, float32 inside");
  m.def("rotary_inplace", &rotary_inplace, "rotate-half rotary embedding, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
}
