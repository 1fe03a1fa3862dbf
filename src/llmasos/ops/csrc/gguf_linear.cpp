// y = x @ W^T with W kept in GGUF's block-quantized layout (Q8_0, Q4_0, Q4_1), on x86 AVX2.
//
// Why: a decode step on CPU is bound by reading the weights. Dequantized to float32 they are
// 4 bytes a weight; in their GGUF blocks 0.56 to 1.06. `gguf_dequantize` (many rows: prefill, then
// a BLAS matmul) writes the float rows with exactly gguf-py's arithmetic. `gguf_linear` (few rows:
// decode) has two paths, split over output rows across threads:
//
// - int16 activations (up to 4 rows, so single-request decode): each block of 32 inputs is rounded
//   to int16 with its own scale, and a block's dot product with the 4-bit weights is two
//   _mm256_madd_epi16, exact in int32. This is llama.cpp's Q8_1 scheme with 16 bits instead of 8:
//   on this Zen 1 EPYC the 16-bit multiply costs the same as maddubs + madd, and the rounding error
//   is 256x smaller (2^-16 of the block's largest |x|; relative error of a matmul ~3e-5), small
//   enough that greedy decoding of the embedded model matches the float model token for token.
//   It needs no int-to-float conversion of the weights, which is what bounded the float path for
//   one row (cvtdq2ps issues on one pipe on Zen 1): 1.7x faster per block, so one row is now bound
//   by memory bandwidth.
// - float32 activations (more rows): each block becomes 32 floats in registers (d * q + m, one FMA)
//   used for a tile of up to 8 rows whose accumulators stay in registers; here the kernel is bound
//   by FMA throughput, which int16 (madd on one pipe of Zen 1) does not beat.
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

constexpr int64_t kBlock = 32;
constexpr int64_t kInt16MaxRows = 4;  // up to this many rows the int16 path is the faster (measured)
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

template <int64_t QT>
constexpr int64_t block_bytes() {
  return QT == Q8_0 ? 34 : QT == Q4_0 ? 18 : 20;
}

// The 32 weights of a block as floats, w[0..3] = elements 0-7, 16-23, 8-15, 24-31 (the order in
// which the nibbles come out; `kXOffset` pairs each with its activations).
constexpr int kXOffset[4] = {0, 16, 8, 24};

template <int64_t QT>
inline void block_weights(const uint8_t* block, __m256 w[4]) {
  if constexpr (QT == Q8_0) {
    const __m256 d = _mm256_set1_ps(half_to_float(block));
    for (int j = 0; j < 4; ++j) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + kXOffset[j]));
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    }
  } else {
    // byte j holds element j in its low nibble and element j + 16 in its high nibble: widen 8 bytes
    // to 32-bit lanes, then the low nibbles are elements j..j+7 and the high ones j+16..j+23
    const uint8_t* qs = block + (QT == Q4_1 ? 4 : 2);
    const float d_scalar = half_to_float(block);
    const __m256 d = _mm256_set1_ps(d_scalar);
    const __m256 m = _mm256_set1_ps(QT == Q4_1 ? half_to_float(block + 2) : -8.f * d_scalar);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int half = 0; half < 2; ++half) {
      const __m256i bytes =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * half)));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, mask));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
      w[2 * half] = _mm256_fmadd_ps(d, lo, m);  // d * q + m (Q4_0: d * q - 8 d, i.e. d * (q - 8))
      w[2 * half + 1] = _mm256_fmadd_ps(d, hi, m);
    }
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// One output row n for a tile of MT input rows: MT x NA accumulators live in registers across all
// blocks (NA > 1 splits each row's sum into independent chains, hiding the FMA latency when the
// tile is too short to do that by itself).
template <int64_t QT, int MT>
inline void row_tile(const uint8_t* wrow, int64_t blocks, const float* x, int64_t ldx, float* y,
                     int64_t ldy) {
  constexpr int NA = MT == 1 ? 4 : MT <= 4 ? 2 : 1;
  __m256 acc[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  __m256 w[4];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = wrow + b * block_bytes<QT>();
    block_weights<QT>(block, w);
    for (int m = 0; m < MT; ++m) {
      const float* xb = x + m * ldx + b * kBlock;
      for (int j = 0; j < 4; ++j)
        acc[m][j % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + kXOffset[j]), w[j], acc[m][j % NA]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[m][a]);
    y[m * ldy] = hsum(s);
  }
}

template <int64_t QT>
void rows_kernel(const uint8_t* wp, int64_t n_begin, int64_t n_end, int64_t blocks, const float* x,
                 int64_t ldx, int64_t rows, float* y, int64_t ldy) {
  const int64_t row_bytes = blocks * block_bytes<QT>();
  // a chunk of weight rows against each tile of at most 8 input rows in turn: the chunk is read
  // from memory once and from L1 for later tiles, and each tile's activations stay in L1 meanwhile
  constexpr int64_t kChunk = 8;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {
      const float* xt = x + m0 * ldx;
      for (int64_t n = n0; n < std::min(n0 + kChunk, n_end); ++n) {
        const uint8_t* wrow = wp + n * row_bytes;
        float* yt = y + m0 * ldy + n;
        switch (std::min<int64_t>(rows - m0, 8)) {
          case 1: row_tile<QT, 1>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 2: row_tile<QT, 2>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 3: row_tile<QT, 3>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 4: row_tile<QT, 4>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 5: row_tile<QT, 5>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 6: row_tile<QT, 6>(wrow, blocks, xt, ldx, yt, ldy); break;
          case 7: row_tile<QT, 7>(wrow, blocks, xt, ldx, yt, ldy); break;
          default: row_tile<QT, 8>(wrow, blocks, xt, ldx, yt, ldy); break;
        }
      }
    }
  }
}

// ---- int16 activations: each block of 32 inputs as x ~ scale * q, q in [-32767, 32767] --------
// A block's dot product with the weights is then exact in int32 (|sum| < 32 * 127 * 32767 < 2^31)
// and costs two _mm256_madd_epi16 instead of unpacking 32 weights to floats; the only error is the
// rounding of x to 16 bits, at most 2^-16 of the block's largest |x| (float32 keeps 2^-24).
struct QuantizedRows {
  std::vector<int16_t> q;    // [rows, K]
  std::vector<float> scale;  // [rows, blocks]
  std::vector<float> sum;    // [rows, blocks]: sum of the block's float x, for Q4_1's minimum
};

QuantizedRows quantize_rows(const float* x, int64_t ldx, int64_t rows, int64_t blocks) {
  QuantizedRows out{std::vector<int16_t>(rows * blocks * kBlock), std::vector<float>(rows * blocks),
                    std::vector<float>(rows * blocks)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * ldx + b * kBlock;
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
      const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float largest = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
      const float scale = largest / 32767.f;
      const __m256 inv = _mm256_set1_ps(largest > 0.f ? 32767.f / largest : 0.f);
      out.scale[m * blocks + b] = scale;
      out.sum[m * blocks + b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
      int16_t* q = out.q.data() + (m * blocks + b) * kBlock;
      for (int j = 0; j < 4; j += 2) {
        // packs interleaves 128-bit lanes; the permute puts the 16 values back in order
        const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)),
                                                  _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], inv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * j), _mm256_permute4x64_epi64(packed, 0xD8));
      }
    }
  }
  return out;
}

// The 32 weights of a block as int16, elements 0-15 and 16-31 (Q4_0 already minus 8; Q4_1 without
// its minimum, which is added as minimum * sum(x)).
template <int64_t QT>
inline void block_weights_i16(const uint8_t* block, __m256i w[2]) {
  if constexpr (QT == Q8_0) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18)));
  } else {
    const __m256i bytes =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (QT == Q4_1 ? 4 : 2))));
    w[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(bytes, 4);
    if constexpr (QT == Q4_0) {
      w[0] = _mm256_sub_epi16(w[0], _mm256_set1_epi16(8));
      w[1] = _mm256_sub_epi16(w[1], _mm256_set1_epi16(8));
    }
  }
}

template <int64_t QT, int MT>
inline void block_dot_i16(const uint8_t* block, int64_t b, int64_t blocks, const int16_t* q, const float* scale,
                          const float* sum, __m256 acc[MT], float min_acc[MT]) {
  __m256i w[2];
  block_weights_i16<QT>(block, w);
  const float d = half_to_float(block);
  const float minimum = QT == Q4_1 ? half_to_float(block + 2) : 0.f;
  for (int m = 0; m < MT; ++m) {
    const int16_t* qb = q + (m * blocks + b) * kBlock;
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb))),
        _mm256_madd_epi16(w[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 16))));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * scale[m * blocks + b]), acc[m]);
    if constexpr (QT == Q4_1) min_acc[m] += minimum * sum[m * blocks + b];
  }
}

template <int64_t QT, int MT>
inline void row_tile_i16(const uint8_t* wrow, int64_t blocks, const QuantizedRows& xq, int64_t m0, float* y,
                         int64_t ldy) {
  // short tiles alternate two sets of accumulators between even and odd blocks: independent
  // chains hide the FMA latency (one set of 1-2 rows would wait on it every block)
  constexpr int NA = MT <= 2 ? 2 : 1;
  __m256 acc[NA][MT];
  float min_acc[NA][MT];
  for (int a = 0; a < NA; ++a)
    for (int m = 0; m < MT; ++m) acc[a][m] = _mm256_setzero_ps(), min_acc[a][m] = 0.f;
  const int16_t* q = xq.q.data() + m0 * blocks * kBlock;
  const float* scale = xq.scale.data() + m0 * blocks;
  const float* sum = xq.sum.data() + m0 * blocks;
  int64_t b = 0;
  for (; b + NA <= blocks; b += NA)
    for (int a = 0; a < NA; ++a)
      block_dot_i16<QT, MT>(wrow + (b + a) * block_bytes<QT>(), b + a, blocks, q, scale, sum, acc[a], min_acc[a]);
  for (; b < blocks; ++b)
    block_dot_i16<QT, MT>(wrow + b * block_bytes<QT>(), b, blocks, q, scale, sum, acc[0], min_acc[0]);
  for (int m = 0; m < MT; ++m) {
    __m256 s = acc[0][m];
    float mins = min_acc[0][m];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[a][m]), mins += min_acc[a][m];
    y[m * ldy] = hsum(s) + mins;
  }
}

template <int64_t QT>
void rows_kernel_i16(const uint8_t* wp, int64_t n_begin, int64_t n_end, int64_t blocks, const QuantizedRows& xq,
                     int64_t rows, float* y, int64_t ldy) {
  const int64_t row_bytes = blocks * block_bytes<QT>();
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wrow = wp + n * row_bytes;
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {
      float* yt = y + m0 * ldy + n;
      switch (std::min<int64_t>(rows - m0, 8)) {
        case 1: row_tile_i16<QT, 1>(wrow, blocks, xq, m0, yt, ldy); break;
        case 2: row_tile_i16<QT, 2>(wrow, blocks, xq, m0, yt, ldy); break;
        case 3: row_tile_i16<QT, 3>(wrow, blocks, xq, m0, yt, ldy); break;
        case 4: row_tile_i16<QT, 4>(wrow, blocks, xq, m0, yt, ldy); break;
        case 5: row_tile_i16<QT, 5>(wrow, blocks, xq, m0, yt, ldy); break;
        case 6: row_tile_i16<QT, 6>(wrow, blocks, xq, m0, yt, ldy); break;
        case 7: row_tile_i16<QT, 7>(wrow, blocks, xq, m0, yt, ldy); break;
        default: row_tile_i16<QT, 8>(wrow, blocks, xq, m0, yt, ldy); break;
      }
    }
  }
}

}  // namespace

// Few rows (decode). x may be a strided view of rows (e.g. one half of a packed gate/up output).
// path: 0 float32 activations, 1 int16 activations, -1 the faster for this many rows.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features, int64_t path) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in_features, "x must be [M, K] float32");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 blocks");
  TORCH_CHECK(in_features % kBlock == 0, "in_features must be a multiple of 32");
  TORCH_CHECK(qtype == Q8_0 || qtype == Q4_0 || qtype == Q4_1, "unsupported GGUF type ", qtype);
  if (x.stride(1) != 1 || x.stride(0) < in_features) x = x.contiguous();
  const int64_t rows = x.size(0), out_features = w.size(0), blocks = in_features / kBlock;
  const int64_t ldx = rows > 1 ? x.stride(0) : in_features;
  TORCH_CHECK(w.size(1) == blocks * (qtype == Q8_0 ? 34 : qtype == Q4_0 ? 18 : 20), "w has the wrong block size");
  auto y = torch::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // split over output rows: each thread gets one contiguous run of them (one sequential stream of
  // weight blocks, its own cache lines of y); below 64 rows a second thread is not worth waking
  if (path < 0) path = rows <= kInt16MaxRows ? 1 : 0;
  if (path == 1) {
    const QuantizedRows xq = quantize_rows(xp, ldx, rows, blocks);
    at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
      if (qtype == Q4_1)
        rows_kernel_i16<Q4_1>(wp, begin, end, blocks, xq, rows, yp, out_features);
      else if (qtype == Q8_0)
        rows_kernel_i16<Q8_0>(wp, begin, end, blocks, xq, rows, yp, out_features);
      else
        rows_kernel_i16<Q4_0>(wp, begin, end, blocks, xq, rows, yp, out_features);
    });
    return y;
  }
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    if (qtype == Q4_1)
      rows_kernel<Q4_1>(wp, begin, end, blocks, xp, ldx, rows, yp, out_features);
    else if (qtype == Q8_0)
      rows_kernel<Q8_0>(wp, begin, end, blocks, xp, ldx, rows, yp, out_features);
    else
      rows_kernel<Q4_0>(wp, begin, end, blocks, xp, ldx, rows, yp, out_features);
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
  register_decode_stack(m);
  m.def("gguf_linear", &gguf_linear, "y = x @ dequantize(w)^T for GGUF-blocked w", py::arg("x"), py::arg("w"),
        py::arg("qtype"), py::arg("in_features"), py::arg("path") = -1);
  m.def("gguf_dequantize", &gguf_dequantize, "GGUF blocks -> float32 rows");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding, in place");
  m.def("store_kv", &store_kv, "write new K/V rows into the paged cache");
  m.def("decode_attention", &decode_attention, "one-token attention straight from the paged cache");
}
