// y = x @ W^T with W kept in GGUF's block-quantized layout (Q8_0, Q4_0, Q4_1), on x86 AVX2.
//
// Why: a decode step on CPU is bound by reading the weights. Dequantized to float32 they are
// 4 bytes a weight; in their GGUF blocks 0.56 to 1.06. `gguf_linear` (few rows: decode) turns each
// block into floats in registers and uses it for every input row; `gguf_dequantize` (many rows:
// prefill, then a BLAS matmul) writes the float rows with exactly gguf-py's arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml type ids

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline void store_nibbles(const uint8_t* qs, __m256 d, __m256 m, bool offset8, float* out) {
  // byte j holds element j in its low nibble and element j + 16 in its high nibble
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i halves[2] = {lo, hi};
  const __m256i eight = _mm256_set1_epi32(8);
  for (int h = 0; h < 2; ++h) {
    for (int part = 0; part < 2; ++part) {
      __m256i q = _mm256_cvtepu8_epi32(part ? _mm_srli_si128(halves[h], 8) : halves[h]);
      if (offset8) q = _mm256_sub_epi32(q, eight);
      __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
      if (!offset8) v = _mm256_add_ps(v, m);  // d * q + m, two roundings, as the reference
      _mm256_storeu_ps(out + h * 16 + part * 8, v);
    }
  }
}

void dequantize_row(const uint8_t* row, int64_t qtype, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, out += kBlock) {
    if (qtype == Q8_0) {
      const uint8_t* block = row + b * 34;
      const __m256 d = _mm256_set1_ps(half_to_float(block));
      for (int j = 0; j < kBlock; j += 8) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + j));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8))));
      }
    } else if (qtype == Q4_0) {
      const uint8_t* block = row + b * 18;
      store_nibbles(block + 2, _mm256_set1_ps(half_to_float(block)), _mm256_setzero_ps(), true, out);
    } else {
      const uint8_t* block = row + b * 20;
      store_nibbles(block + 4, _mm256_set1_ps(half_to_float(block)), _mm256_set1_ps(half_to_float(block + 2)),
                    false, out);
    }
  }
}

// The 32 weights of a block as signed bytes in element order: Q8_0's as stored, the 4-bit layouts'
// nibbles centred (q - 8), which keeps the integer dot small (no cancellation against the offset).
inline __m256i block_bytes(const uint8_t* block, int64_t qtype) {
  if (qtype == Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (qtype == Q4_1 ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
  return _mm256_sub_epi8(q, _mm256_set1_epi8(8));
}

// 8 partial sums of w_k * x_k over a block in int32, both int8 (llama.cpp's Q8 dot product).
inline __m256i block_dot(__m256i w, __m256i x) {
  // maddubs multiplies unsigned by signed bytes: take |w| and move w's sign onto x
  const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

}  // namespace

// Few rows (decode), llama.cpp's way: each input row is quantized to int8 per block of 32
// (scale max|x| / 127), so a block's dot product is a handful of integer multiply-adds; the block
// scales multiply the result. Q4_1's minimum uses the exact float block sums.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features) {
  constexpr int64_t kMaxRows = 32;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in_features, "x must be [M, K] float32");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most 32 rows; dequantize and use a matmul for more");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 blocks");
  TORCH_CHECK(in_features % kBlock == 0, "in_features must be a multiple of 32");
  x = x.contiguous();
  const int64_t rows = x.size(0), out_features = w.size(0), blocks = in_features / kBlock;
  const int64_t row_bytes = w.size(1), block_bytes_n = row_bytes / blocks;
  const float* xp = x.data_ptr<float>();
  std::vector<int8_t> xq(rows * in_features);
  std::vector<float> x_scale(rows * blocks), x_sum(rows * blocks);
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* xb = xp + i * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k])), sum += xb[k];
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    for (int k = 0; k < kBlock; ++k) xq[i * kBlock + k] = static_cast<int8_t>(std::nearbyint(xb[k] * inverse));
    x_scale[i] = scale, x_sum[i] = sum;
  }
  auto y = torch::empty({rows, out_features}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // Four output rows at a time: four independent accumulator chains, and each x block loaded once.
  constexpr int64_t kTile = 4;
  at::parallel_for(0, (out_features + kTile - 1) / kTile, 4, [&](int64_t tile_begin, int64_t tile_end) {
    __m256 acc[kTile][kMaxRows];
    float offset_acc[kTile][kMaxRows];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kTile, tile_rows = std::min(kTile, out_features - n0);
      for (int64_t r = 0; r < kTile; ++r)
        for (int64_t m = 0; m < rows; ++m) acc[r][m] = _mm256_setzero_ps(), offset_acc[r][m] = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        __m256i wb[kTile];
        float d[kTile], offset[kTile];
        for (int64_t r = 0; r < tile_rows; ++r) {
          const uint8_t* block = wp + (n0 + r) * row_bytes + b * block_bytes_n;
          wb[r] = block_bytes(block, qtype);
          d[r] = half_to_float(block);
          // Q4_1: d (q - 8) + (m + 8 d); Q4_0: d (q - 8) exactly
          offset[r] = qtype == Q4_1 ? half_to_float(block + 2) + 8.f * d[r] : 0.f;
        }
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t i = m * blocks + b;
          const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.data() + i * kBlock));
          for (int64_t r = 0; r < tile_rows; ++r) {
            const __m256 dot = _mm256_cvtepi32_ps(block_dot(wb[r], xb));
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d[r] * x_scale[i]), dot, acc[r][m]);
            offset_acc[r][m] += offset[r] * x_sum[i];
          }
        }
      }
      for (int64_t r = 0; r < tile_rows; ++r)
        for (int64_t m = 0; m < rows; ++m) yp[m * out_features + n0 + r] = hsum(acc[r][m]) + offset_acc[r][m];
    }
  });
  return y;
}

torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features) {
  const int64_t out_features = w.size(0), blocks = in_features / kBlock;
  auto out = torch::empty({out_features, in_features}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) dequantize_row(wp + n * w.size(1), qtype, blocks, op + n * in_features);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_linear", &gguf_linear, "y = x @ dequantize(w)^T for GGUF-blocked w");
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks -> float32 rows");
}
