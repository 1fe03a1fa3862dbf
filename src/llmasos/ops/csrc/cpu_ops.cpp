// The small per-layer ops of a CPU decode step, fused (float32, AVX2).
//
// Why: with the weights in GGUF blocks a SmolLM2 decode step spends as long in the small eager ops
// around the matmuls as in the matmuls: torch's CPU rms_norm alone is five kernels, rotary seven,
// paged attention a gather per K and V plus SDPA; each costs 5-20 us of dispatch on a 2-core
// machine, times 30 layers. Each function here is one call doing what several did, with the same
// arithmetic up to summation order (the Python modules keep the reference code for other devices
// and dtypes, and the tests compare the two).
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// The 8 lane sums of v[0..7] as one vector: [sum(v[0]), ..., sum(v[7])].
inline __m256 hsum8(const __m256 v[8]) {
  // hadd pairs neighbours within each 128-bit half; two rounds leave, in half k of u[0], the
  // k-th half's sums of v[0..3] (u[1]: of v[4..7]), and adding the halves finishes them
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) for 8 floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial), relative error
// about 1e-7, as Sleef's expf that torch's vectorized CPU kernels use.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// out[0 .. 8N) = inv * sum over l of p[l] * V row l (at v0 + slots[l] * slot_stride), skipping the
// rows of weight 0 (masked padding). The N sums live in registers across all rows.
template <int N>
inline void weighted_sum(const float* p, int64_t len, const float* v0, int64_t slot_stride, const int64_t* slots,
                         float inv, float* out) {
  __m256 acc[N];
  for (int k = 0; k < N; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {
    if (p[l] == 0.f) continue;
    const __m256 weight = _mm256_set1_ps(p[l]);
    const float* row = v0 + slots[l] * slot_stride;
    for (int k = 0; k < N; ++k) acc[k] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(row + 8 * k), acc[k]);
  }
  for (int k = 0; k < N; ++k) _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(acc[k], _mm256_set1_ps(inv)));
}

// 8 positions' scores: their dot products with q (dim % 8 == 0), as one vector: 8 independent FMA
// chains (one dot product's chain alone waits on the FMA latency at every step), summed across lanes
// together by one transpose-add
inline __m256 dots8(const float* qh, const float* const rows8[8], int64_t dim) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 qd = _mm256_loadu_ps(qh + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(rows8[j] + d), acc[j]);
  }
  return hsum8(acc);
}

// max(p[0..n)) in 4 vector chains (std::max_element is one scalar chain: a tenth of decode attention)
inline float max_of(const float* p, int64_t n) {
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m[4] = {lowest, lowest, lowest, lowest};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) m[k] = _mm256_max_ps(m[k], _mm256_loadu_ps(p + i + 8 * k));
  for (; i + 8 <= n; i += 8) m[0] = _mm256_max_ps(m[0], _mm256_loadu_ps(p + i));
  const __m256 v = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float best = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) best = std::max(best, p[i]);
  return best;
}

#if defined(__AVX512F__)
// The AVX-512 build's attention: the same sums on 512-bit registers, half the instructions (on this Zen 5
// EPYC, 512-bit FMAs run at the 256-bit ones' rate). The order of additions within a dot product
// differs from the 256-bit code's, so the two builds' attention agrees to float32 rounding, not bits.
// dots8 on 512-bit registers (dim % 16 == 0)
inline __m256 dots8_wide(const float* qh, const float* const rows8[8], int64_t dim) {
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 qd = _mm512_loadu_ps(qh + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(rows8[j] + d), acc[j]);
  }
  __m256 halves[8];
  for (int j = 0; j < 8; ++j)
    halves[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
  return hsum8(halves);
}

// weighted_sum over 16N columns in 512-bit registers, positions two at a time into two sets of sums: one
// set alone waits on the FMA latency at every position (N FMAs a position are fewer than it covers)
template <int N>
inline void weighted_sum_wide(const float* p, int64_t len, const float* v0, int64_t slot_stride, const int64_t* slots,
                              float inv, float* out) {
  alignas(64) static const float zeros[16 * N] = {};  // the row of a weight-0 position (padding may be NaN)
  auto row = [&](int64_t l) { return p[l] == 0.f ? zeros : v0 + slots[l] * slot_stride; };
  __m512 even[N], odd[N];
  for (int k = 0; k < N; ++k) even[k] = odd[k] = _mm512_setzero_ps();
  int64_t l = 0;
  for (; l + 2 <= len; l += 2) {
    const float *r0 = row(l), *r1 = row(l + 1);
    const __m512 w0 = _mm512_set1_ps(p[l]), w1 = _mm512_set1_ps(p[l + 1]);
    for (int k = 0; k < N; ++k) {
      even[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r0 + 16 * k), even[k]);
      odd[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r1 + 16 * k), odd[k]);
    }
  }
  if (l < len) {
    const float* r0 = row(l);
    const __m512 w0 = _mm512_set1_ps(p[l]);
    for (int k = 0; k < N; ++k) even[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r0 + 16 * k), even[k]);
  }
  for (int k = 0; k < N; ++k)
    _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(_mm512_add_ps(even[k], odd[k]), _mm512_set1_ps(inv)));
}

#endif

// One width of vector registers, for the code written once for both builds: 256-bit (AVX2, 16
// registers) and 512-bit (AVX-512, 32 registers); kMaxRegs: the registers of V columns a head's sums take
// in group_weighted_sums (with 4 heads: 4 x kMaxRegs sums and kMaxRegs V registers live at once)
struct Ymm {
  using V = __m256;
  static constexpr int64_t kFloats = 8, kMaxRegs = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store_scaled(float* p, V v, float scale) { _mm256_storeu_ps(p, _mm256_mul_ps(v, _mm256_set1_ps(scale))); }
};
#if defined(__AVX512F__)
struct Zmm {
  using V = __m512;
  static constexpr int64_t kFloats = 16, kMaxRegs = 4;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store_scaled(float* p, V v, float scale) { _mm512_storeu_ps(p, _mm512_mul_ps(v, _mm512_set1_ps(scale))); }
};
#endif

// out[h][0 .. N registers) = inv[h] * sum over l of p[h][l] * V row l, for G heads of a GQA group at once:
// each V row is loaded once for all of them (weighted_sum loads it once a head), and the G x N sums are
// independent FMA chains. Positions where `valid` is false (masked padding, whose rows may hold
// anything, NaN included) are skipped.
template <class R, int G, int N>
void group_weighted_sums(const float* p, int64_t len, const float* v0, int64_t slot_stride, const int64_t* slots,
                         const bool* valid, const float* inv, float* out, int64_t out_stride) {
  typename R::V acc[G][N];
  for (int h = 0; h < G; ++h)
    for (int k = 0; k < N; ++k) acc[h][k] = R::zero();
  for (int64_t l = 0; l < len; ++l) {
    if (valid && !valid[l]) continue;
    const float* row = v0 + slots[l] * slot_stride;
    typename R::V v[N];
    for (int k = 0; k < N; ++k) v[k] = R::load(row + R::kFloats * k);
    for (int h = 0; h < G; ++h) {
      const typename R::V w = R::set1(p[h * len + l]);
      for (int k = 0; k < N; ++k) acc[h][k] = R::fma(w, v[k], acc[h][k]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int k = 0; k < N; ++k) R::store_scaled(out + h * out_stride + R::kFloats * k, acc[h][k], inv[h]);
}

using GroupSums = void (*)(const float*, int64_t, const float*, int64_t, const int64_t*, const bool*, const float*,
                           float*, int64_t);

template <class R, int G>
GroupSums group_sums_of_width(int64_t regs) {
  if constexpr (R::kMaxRegs == 4) {
    if (regs == 4) return group_weighted_sums<R, G, 4>;
    if (regs == 3) return group_weighted_sums<R, G, 3>;
  }
  return regs == 2 ? group_weighted_sums<R, G, 2> : group_weighted_sums<R, G, 1>;
}

// Every head of a GQA group attends to V: up to 4 heads and kMaxRegs registers of columns at a time.
template <class R>
void group_attend_v(const float* p, int64_t len, const float* v0, int64_t slot_stride, const int64_t* slots,
                    const bool* valid, const float* inv, float* out, int64_t dim, int64_t group) {
  constexpr int64_t cols = R::kFloats * R::kMaxRegs;
  for (int64_t h0 = 0; h0 < group; h0 += 4) {
    const int64_t heads = std::min<int64_t>(group - h0, 4);
    for (int64_t d = 0; d < dim; d += cols) {
      const int64_t regs = std::min(dim - d, cols) / R::kFloats;
      const GroupSums sums = heads == 4   ? group_sums_of_width<R, 4>(regs)
                             : heads == 3 ? group_sums_of_width<R, 3>(regs)
                             : heads == 2 ? group_sums_of_width<R, 2>(regs)
                                          : group_sums_of_width<R, 1>(regs);
      sums(p + h0 * len, len, v0 + d, slot_stride, slots, valid, inv + h0, out + h0 * dim + d, dim);
    }
  }
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dtype() == torch::kFloat32, name, " must be a float32 CPU tensor");
}

}  // namespace

// RMSNorm over the last dim of x [T, D] (rows may be strided). With a residual: residual += x in
// place first, and the sum is normalized (the pre-norm residual stream of a decoder layer).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous(), "x must be [T, D] rows, weight contiguous");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(dim % 8 == 0 && weight.numel() == dim, "dim must be a multiple of 8");
  float* res = nullptr;
  if (residual) {
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(), "residual must be contiguous [T, D]");
    res = residual->data_ptr<float>();
  }
  auto y = torch::empty({rows, dim}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  for (int64_t t = 0; t < rows; ++t) {
    const float* src = xp + t * ldx;
    if (res) {
      float* r = res + t * dim;
      for (int64_t i = 0; i < dim; i += 8)
        _mm256_storeu_ps(r + i, _mm256_add_ps(_mm256_loadu_ps(src + i), _mm256_loadu_ps(r + i)));
      src = r;
    }
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < dim; i += 8) {
      const __m256 v = _mm256_loadu_ps(src + i);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(hsum(ss) / dim + static_cast<float>(eps)));
    float* out = yp + t * dim;
    for (int64_t i = 0; i < dim; i += 8)
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(src + i), rstd)));
  }
  return y;
}

// silu(gate) * up for x = [T, 2I] holding gate then up in each row -> [T, I].
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 16 == 0, "x must be [T, 2I] rows, I % 8 == 0");
  const int64_t rows = x.size(0), inter = x.size(1) / 2, ldx = x.stride(0);
  auto y = torch::empty({rows, inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = xp + t * ldx;
      const float* up = gate + inter;
      for (int64_t i = 0; i < inter; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(yp + t * inter + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
      }
    }
  });
  return y;
}

// In place: x [T, H, D] (rows and heads may be strided, D contiguous) <- x cos + rotate_half(x) sin,
// cos and sin [T, 1, D] (or [T, D]).
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 16 == 0, "x must be [T, H, D], D % 16 == 0");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2), "bad cos/sin");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cp + t * dim;
    const float* s = sp + t * dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = xp + t * x.stride(0) + h * x.stride(1);
      for (int64_t i = 0; i < half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + half + i);
        const __m256 r1 = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                        _mm256_mul_ps(x2, _mm256_loadu_ps(s + i)));
        const __m256 r2 = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                        _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
        _mm256_storeu_ps(v + i, r1);
        _mm256_storeu_ps(v + half + i, r2);
      }
    }
  }
}

// k/v [T, Hk, D] (rows may be strided) into the caches [blocks, block_size, Hk, D] at slots [T].
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  check_float(k, "k");
  check_float(v, "v");
  TORCH_CHECK(k.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2), "k must be [T, Hk, D] with dense rows");
  TORCH_CHECK(v.dim() == 3 && v.stride(2) == 1 && v.stride(1) == v.size(2), "v must be [T, Hk, D] with dense rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.is_contiguous(), "slots must be int64");
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2);
  const int64_t capacity = k_cache.numel() / row;
  const int64_t* sl = slots.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sl[t] >= 0 && sl[t] < capacity, "cache slot out of range");
    std::memcpy(kc + sl[t] * row, k.data_ptr<float>() + t * k.stride(0), row * sizeof(float));
    std::memcpy(vc + sl[t] * row, v.data_ptr<float>() + t * v.stride(0), row * sizeof(float));
  }
}

// Decode attention straight from the paged cache (no gather): out[rows[b]] = softmax(q k^T * scale) v
// over the context slots[b, :] (mask [B, L] or [B, 1, 1, L] bool, False on padding). q: [T, Hq, D]
// (rows strided), caches [blocks, block_size, Hk, D]; GQA heads share their K/V rows.
void decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor rows,
                      torch::Tensor slots, c10::optional<torch::Tensor> mask, double scale, torch::Tensor out) {
  check_float(q, "q");
  check_float(out, "out");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.size(2) % 8 == 0, "q must be [T, Hq, D], D % 8 == 0");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes(), "out must be contiguous like q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(rows.dtype() == torch::kInt64 && slots.dtype() == torch::kInt64 && slots.dim() == 2, "int64 rows/slots");
  rows = rows.contiguous();
  slots = slots.contiguous();
  const int64_t batch = slots.size(0), len = slots.size(1);
  const int64_t q_heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(-2), group = q_heads / kv_heads;
  TORCH_CHECK(k_cache.size(-1) == dim && q_heads % kv_heads == 0 && rows.numel() == batch, "shape mismatch");
  const int64_t capacity = k_cache.numel() / (kv_heads * dim);
  const bool* mp = nullptr;
  torch::Tensor mask_c;
  if (mask) {
    mask_c = mask->contiguous();
    TORCH_CHECK(mask_c.dtype() == torch::kBool && mask_c.numel() == batch * len, "mask must be bool [B, L]");
    mp = mask_c.data_ptr<bool>();
  }
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * len; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < capacity, "cache slot out of range");
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t work = batch * q_heads * len * dim;
  [[maybe_unused]] const bool wide = dim % 16 == 0;
  // one task per (sequence, kv head): its group of query heads shares the K/V rows, hot in cache
  auto task = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * len), inv_total(group);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i % batch, g = i / batch;  // one head's rows in turn: a sequence's verify rows reuse its K/V in cache
      const float* qrow = qp + rp[b] * q.stride(0) + g * group * q.stride(1);
      auto krow = [&](int64_t l) { return kc + (sp[b * len + l] * kv_heads + g) * dim; };
      // 8 positions at a time, every head of the group against them while their K rows are in L1
      int64_t l = 0;
      for (; l + 8 <= len; l += 8) {
        const float* rows8[8];
        for (int j = 0; j < 8; ++j) rows8[j] = krow(l + j);
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qrow + h * q.stride(1);
#if defined(__AVX512F__)
          const __m256 dots = wide ? dots8_wide(qh, rows8, dim) : dots8(qh, rows8, dim);
#else
          const __m256 dots = dots8(qh, rows8, dim);
#endif
          _mm256_storeu_ps(scores.data() + h * len + l, _mm256_mul_ps(dots, _mm256_set1_ps(fscale)));
        }
      }
      for (; l < len; ++l)
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qrow + h * q.stride(1);
          __m256 s = _mm256_setzero_ps();
          for (int64_t d = 0; d < dim; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(krow(l) + d), s);
          scores[h * len + l] = hsum(s) * fscale;
        }
      const bool* valid = mp ? mp + b * len : nullptr;
      if (valid)
        for (int64_t h = 0; h < group; ++h) {
          float* sc = scores.data() + h * len;
          for (l = 0; l + 8 <= len; l += 8) {  // 8 bools (bytes of 0 or 1) widened to a lane mask
            const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(valid + l)));
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(flags, _mm256_setzero_si256()));
            _mm256_storeu_ps(sc + l, _mm256_blendv_ps(_mm256_set1_ps(neg_inf), _mm256_loadu_ps(sc + l), keep));
          }
          for (; l < len; ++l) sc[l] = valid[l] ? sc[l] : neg_inf;
        }
      for (int64_t h = 0; h < group; ++h) {
        float* sc = scores.data() + h * len;
        const float maximum = max_of(sc, len);
        float total = 0.f;
        int64_t l = 0;
        const __m256 vmax = _mm256_set1_ps(maximum);
        __m256 vtotal = _mm256_setzero_ps();
        for (; l + 8 <= len; l += 8) {
          const __m256 s = _mm256_loadu_ps(sc + l);  // masked scores are -inf: weight exactly 0
          const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(s, vmax)),
                                         _mm256_cmp_ps(s, _mm256_set1_ps(neg_inf), _CMP_NEQ_OQ));
          _mm256_storeu_ps(sc + l, e);
          vtotal = _mm256_add_ps(vtotal, e);
        }
        total = hsum(vtotal);
        for (; l < len; ++l) total += (sc[l] = std::exp(sc[l] - maximum));
        if (group > 1) {  // the whole group's weighted sums below, each V row loaded once
          inv_total[h] = 1.f / total;
          continue;
        }
        float* orow = op + (rp[b] * q_heads + g * group + h) * dim;
#if defined(__AVX512F__)
        if (wide) {
          for (int64_t d = 0; d < dim; d += 128) {  // 128 columns at a time in 8 registers
            const float* v0 = vc + g * dim + d;
            const int64_t* sl = sp + b * len;
            const float inv = 1.f / total;
            switch (std::min<int64_t>(dim - d, 128) / 16) {
              case 8: weighted_sum_wide<8>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 7: weighted_sum_wide<7>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 6: weighted_sum_wide<6>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 5: weighted_sum_wide<5>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 4: weighted_sum_wide<4>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 3: weighted_sum_wide<3>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              case 2: weighted_sum_wide<2>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
              default: weighted_sum_wide<1>(sc, len, v0, kv_heads * dim, sl, inv, orow + d); break;
            }
          }
          continue;
        }
#endif
        for (int64_t d = 0; d < dim; d += 64) {  // 64 columns at a time: their sums stay in registers
          const float* v0 = vc + g * dim + d;
          switch (std::min<int64_t>(dim - d, 64) / 8) {
            case 8: weighted_sum<8>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 7: weighted_sum<7>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 6: weighted_sum<6>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 5: weighted_sum<5>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 4: weighted_sum<4>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 3: weighted_sum<3>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            case 2: weighted_sum<2>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
            default: weighted_sum<1>(sc, len, v0, kv_heads * dim, sp + b * len, 1.f / total, orow + d); break;
          }
        }
      }
      if (group > 1) {
        const float* v0 = vc + g * dim;
        float* out0 = op + (rp[b] * q_heads + g * group) * dim;
        const int64_t* sl = sp + b * len;
#if defined(__AVX512F__)
        if (wide) {
          group_attend_v<Zmm>(scores.data(), len, v0, kv_heads * dim, sl, valid, inv_total.data(), out0, dim, group);
          continue;
        }
#endif
        group_attend_v<Ymm>(scores.data(), len, v0, kv_heads * dim, sl, valid, inv_total.data(), out0, dim, group);
      }
    }
  };
  if (work < (1 << 18))
    task(0, batch * kv_heads);  // a thread fork costs more than this
  else
    at::parallel_for(0, batch * kv_heads, 1, task);
}
