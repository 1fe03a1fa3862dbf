// y = x @ W^T with W kept in GGUF's block-quantized layout (Q8_0, Q4_0, Q4_1), on x86 AVX2.
//
// Why: a decode step on CPU is bound by reading the weights. Dequantized to float32 they are
// 4 bytes a weight; in their GGUF blocks 0.56 to 1.06. `gguf_linear` (few rows: decode) turns each
// block into floats in registers and uses it for every input row; `gguf_dequantize` (many rows:
// prefill, then a BLAS matmul) writes the float rows with exactly gguf-py's arithmetic.
// (Quantizing the activations to int8 as llama.cpp does was no faster on the 2-core AVX2 machine
// we measured, and it flipped greedy answers of the embedded model, so activations stay float.)
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

// The 32 weights of a block as four vectors of 8 floats, before the scale: Q8_0's q, Q4_0's q - 8,
// Q4_1's q (its minimum is added separately).
inline void block_values(const uint8_t* block, int64_t qtype, __m256 q[4]) {
  if (qtype == Q8_0) {
    for (int j = 0; j < 4; ++j) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * j));
      q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
    }
    return;
  }
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (qtype == Q4_1 ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i halves[2] = {_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask)};
  const __m256i offset = _mm256_set1_epi32(qtype == Q4_0 ? 8 : 0);
  for (int j = 0; j < 4; ++j) {
    const __m128i half = j % 2 ? _mm_srli_si128(halves[j / 2], 8) : halves[j / 2];
    q[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(half), offset));
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

}  // namespace

// Few rows (decode): each block's weights become floats once, in registers, and serve every input
// row: sum_k x_k (d q_k + m) = d sum_k x_k q_k + m sum_k x_k. Activations stay float32, so the result
// differs from the float model's matmul only by summation order.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features) {
  constexpr int64_t kMaxRows = 32;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in_features, "x must be [M, K] float32");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most 32 rows; dequantize and use a matmul for more");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 blocks");
  TORCH_CHECK(in_features % kBlock == 0, "in_features must be a multiple of 32");
  x = x.contiguous();
  const int64_t rows = x.size(0), out_features = w.size(0), blocks = in_features / kBlock;
  const int64_t row_bytes = w.size(1), block_bytes = row_bytes / blocks;
  const float* xp = x.data_ptr<float>();
  std::vector<float> x_sum(rows * blocks);  // for Q4_1's minimum
  if (qtype == Q4_1)
    for (int64_t i = 0; i < rows * blocks; ++i) {
      const float* xb = xp + i * kBlock;
      x_sum[i] = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                    _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24))));
    }
  auto y = torch::empty({rows, out_features}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    __m256 acc[kMaxRows];
    float min_acc[kMaxRows];
    __m256 q[4];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = wp + n * row_bytes;
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm256_setzero_ps(), min_acc[m] = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* block = row + b * block_bytes;
        block_values(block, qtype, q);
        const __m256 d = _mm256_set1_ps(half_to_float(block));
        const float minimum = qtype == Q4_1 ? half_to_float(block + 2) : 0.f;
        for (int64_t m = 0; m < rows; ++m) {
          const float* xb = xp + m * in_features + b * kBlock;
          __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xb), q[0]);
          s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q[1], s);
          s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q[2], s);
          s = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q[3], s);
          acc[m] = _mm256_fmadd_ps(d, s, acc[m]);
          min_acc[m] += minimum * x_sum[m * blocks + b];
        }
      }
      for (int64_t m = 0; m < rows; ++m) yp[m * out_features + n] = hsum(acc[m]) + min_acc[m];
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
