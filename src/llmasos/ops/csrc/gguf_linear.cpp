// y = x @ W^T with W in GGUF's block-quantized formats (Q8_0, Q4_0, Q4_1), on x86 AVX2 or VNNI (here),
// or ARM NEON with the dot-product instructions (gguf_neon.h).
//
// Why: a decode step on CPU reads every weight once per token; dequantized to float32 they are
// 4 bytes a weight, in their blocks 0.56 to 1.06. `gguf_linear` multiplies the blocks as integers
// against activations rounded to integers, in a layout that ops/quant.py repacks the GGUF blocks
// into once at load (below: 8 rows interleaved); on this machine that is 2-3x the multiplies per
// cycle of the int16 and float kernels it replaced. It takes decode steps, and at 8-bit activations
// prompts too (ops/quant.py kernel_row_limit). `gguf_dequantize` writes float rows with exactly
// gguf-py's arithmetic, for BLAS where the kernel does not take the rows.
#include "kernels.h"
#include "gguf_blocks.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__aarch64__)
#include "gguf_neon.h"  // ARM: its quantize_rows, run_groups and dequantize_row serve the bindings below
#else
#include <immintrin.h>
#endif

using namespace gguf;

namespace {

#if !defined(__aarch64__)
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

// 32 int32 in [-127, 127] -> 32 int8 in order (the packs interleave 128-bit lanes; the permute restores it)
inline void store_bytes(const __m256i q[4], int8_t* out) {
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

IntRows quantize_rows(const float* x, int64_t ldx, int64_t rows, int64_t blocks, int64_t bits) {
  const int64_t planes = bits == 16 ? 2 : 1;
  const float qmax = planes == 2 ? 255.f * 127.f + 127.f : 127.f;
  IntRows out{planes, std::vector<int8_t>(rows * blocks * planes * kBlock), std::vector<float>(rows * blocks),
              std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks)};
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
      const __m256 inv = _mm256_set1_ps(largest > 0.f ? qmax / largest : 0.f);
      // a NaN or infinity in x makes every output NaN (integers cannot carry it; max_ps may drop a
      // NaN from `largest`, the sum keeps it)
      const bool finite = std::isfinite(hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]))));
      const float scale = finite ? largest / qmax : std::numeric_limits<float>::quiet_NaN();
      int8_t* q8 = out.q.data() + (m * blocks + b) * planes * kBlock;
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));  // nearest, ties to even
      const __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      out.scale[m * blocks + b] = scale;
      const float total = hsum(_mm256_cvtepi32_ps(qsum));  // |sum(q)| < 2^24: exact
      out.sum[m * blocks + b] = scale * total;
      out.qsum[m * blocks + b] = static_cast<int32_t>(total);
      if (planes == 1) {
        store_bytes(q, q8);
        continue;
      }
      // hi = round(q / 255) (q / 255 is never a tie: 255 is odd), lo = q - 255 hi, |lo| <= 127
      __m256i hi[4], lo[4];
      for (int j = 0; j < 4; ++j) {
        hi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(q[j]), _mm256_set1_ps(1.f / 255.f)));
        lo[j] = _mm256_add_epi32(_mm256_sub_epi32(q[j], _mm256_slli_epi32(hi[j], 8)), hi[j]);
      }
      store_bytes(hi, q8);
      store_bytes(lo, q8 + kBlock);
    }
  }
  return out;
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// VNNI (AVX-512 VNNI with VL, or AVX-VNNI): vpdpbusd adds 4 unsigned x signed byte products into
// each int32 lane in one instruction, with no int16 step to saturate, where AVX2 needs maddubs then
// madd (or an int16 add). Both give the same integers, so the same floats bit for bit (the tests
// build both and compare them where the CPU has VNNI).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMASOS_DPBUSD(acc, u8, s8) _mm256_dpbusd_epi32(acc, u8, s8)
#elif defined(__AVXVNNI__)
#define LLMASOS_DPBUSD(acc, u8, s8) _mm256_dpbusd_avx_epi32(acc, u8, s8)
#endif

// For one block and MT activation rows: the integer dot products of the group's 8 rows, as 8 int32
// lanes per activation row. 4-bit quants are unsigned (0..15), so they multiply the bytes of x as
// they are. Q8_0 quants are signed: the unsigned operand gets |w| and x takes w's sign.
#ifdef LLMASOS_DPBUSD
template <int64_t QT, int PLANES, int MT>
inline void block_dots(const uint8_t* quants, const int8_t* const xq[MT], __m256i dots[MT]) {
  __m256i sums[MT][PLANES];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < PLANES; ++p) sums[m][p] = _mm256_setzero_si256();
  if constexpr (QT == Q8_0) {
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
      const __m256i magnitude = _mm256_abs_epi8(w);
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p)
          sums[m][p] = LLMASOS_DPBUSD(sums[m][p], magnitude, _mm256_sign_epi8(broadcast4(xq[m] + p * kBlock + 4 * c), w));
    }
  } else {
    // chunk c's low nibbles are elements 4c..4c+3 of each row, its high nibbles 16+4c..16+4c+3
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
      const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p) {
          const int8_t* x = xq[m] + p * kBlock;
          sums[m][p] = LLMASOS_DPBUSD(sums[m][p], lo, broadcast4(x + 4 * c));
          sums[m][p] = LLMASOS_DPBUSD(sums[m][p], hi, broadcast4(x + 16 + 4 * c));
        }
    }
  }
  for (int m = 0; m < MT; ++m) {
    dots[m] = sums[m][0];
    // q = 255 hi + lo: 255 hi = 256 hi - hi (at most 255 * 32 * 128 * 127: far inside int32)
    if constexpr (PLANES == 2)
      dots[m] = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(dots[m], 8), dots[m]), sums[m][1]);
  }
}
#else
// AVX2: 4-bit quants go through maddubs, and its int16 pair sums (at most 2 * 15 * 127) add up over
// the whole block (8 * 3810 < 2^15) before one widening madd per plane; Q8_0's pair sums (up to
// 2 * 128 * 127) are widened at once.
template <int64_t QT, int PLANES, int MT>
inline void block_dots(const uint8_t* quants, const int8_t* const xq[MT], __m256i dots[MT]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i plane_weight[2] = {_mm256_set1_epi16(PLANES == 2 ? 255 : 1), ones};  // q = 255 hi + lo
  if constexpr (QT == Q8_0) {
    for (int m = 0; m < MT; ++m) dots[m] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
      const __m256i magnitude = _mm256_abs_epi8(w);
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p) {
          const __m256i x = _mm256_sign_epi8(broadcast4(xq[m] + p * kBlock + 4 * c), w);
          dots[m] = _mm256_add_epi32(dots[m], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), plane_weight[p]));
          if constexpr (MT > 1) asm("" : "+x"(dots[m]));  // as below
        }
    }
  } else {
    // chunk c's low nibbles are elements 4c..4c+3 of each row, its high nibbles 16+4c..16+4c+3
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i sums[MT][PLANES];
    for (int m = 0; m < MT; ++m)
      for (int p = 0; p < PLANES; ++p) sums[m][p] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 32 * c));
      const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p) {
          const int8_t* x = xq[m] + p * kBlock;
          sums[m][p] = _mm256_add_epi16(sums[m][p], _mm256_maddubs_epi16(lo, broadcast4(x + 4 * c)));
          sums[m][p] = _mm256_add_epi16(sums[m][p], _mm256_maddubs_epi16(hi, broadcast4(x + 16 + 4 * c)));
          // several rows: keep GCC from hoisting all the products ahead of their sums, which
          // spills them to the stack (measured: 8-12% slower at 16 rows; one row gains nothing)
          if constexpr (MT > 1) asm("" : "+x"(sums[m][p]));
        }
    }
    for (int m = 0; m < MT; ++m) {
      dots[m] = _mm256_madd_epi16(sums[m][0], plane_weight[0]);
      if constexpr (PLANES == 2) dots[m] = _mm256_add_epi32(dots[m], _mm256_madd_epi16(sums[m][1], ones));
    }
  }
}
#endif

// One group of 8 weight rows against MT activation rows from m0: y[m0 + m, n0 .. n0 + width).
template <int64_t QT, int PLANES, int MT>
void group_tile(const uint8_t* group, int64_t blocks, const IntRows& xa, int64_t m0, float* y, int64_t ldy,
                int64_t width) {
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* rec = group + b * record_bytes<QT>();
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
    const int8_t* xq[MT];
    for (int m = 0; m < MT; ++m) xq[m] = xa.q.data() + ((m0 + m) * blocks + b) * PLANES * kBlock;
    __m256i dots[MT];
    block_dots<QT, PLANES, MT>(rec + quant_offset<QT>(), xq, dots);
    __m256 minimum = _mm256_setzero_ps();  // w = d q + minimum (Q4_0: d (q - 8))
    if constexpr (QT == Q4_1) minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16)));
    if constexpr (QT == Q4_0) minimum = _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m]), _mm256_mul_ps(d, _mm256_set1_ps(xa.scale[i])), acc[m]);
      if constexpr (QT != Q8_0) acc[m] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(xa.sum[i]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* out = y + (m0 + m) * ldy;
    if (width == kGroup) {
      _mm256_storeu_ps(out, acc[m]);
    } else {
      alignas(32) float lanes[kGroup];
      _mm256_store_ps(lanes, acc[m]);
      std::memcpy(out, lanes, width * sizeof(float));
    }
  }
}

// The tile of activation rows one group's records meet per pass (below): as many as the vector
// registers hold with their accumulators, int32 or int16 sums and the unpacked quants. AVX2 has 16;
// AVX-512's VL extension gives the same 256-bit instructions 32.
#if defined(__AVX512VL__)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif

// A tile of `rows` <= MT activation rows, with the accumulators of exactly that many.
template <int64_t QT, int PLANES, int MT>
inline void partial_tile(int64_t rows, const uint8_t* group, int64_t blocks, const IntRows& xa, int64_t m0, float* y,
                         int64_t ldy, int64_t width) {
  if constexpr (MT > 1)
    if (rows < MT) return partial_tile<QT, PLANES, MT - 1>(rows, group, blocks, xa, m0, y, ldy, width);
  group_tile<QT, PLANES, MT>(group, blocks, xa, m0, y, ldy, width);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AVX-512 VNNI on 512-bit registers: two groups at a time, group g's 8 rows in lanes 0-7 and g + 1's in
// lanes 8-15, so one vpdpbusd makes 64 products where the 256-bit one makes 32 (measured on this Zen 5
// EPYC: 150 against 87 GMAC/s a core). Each lane computes what the 256-bit kernel computes for its
// row, the same integers and the same float operations in the same order: the same bits. Q8_0 has
// no 512-bit sign instruction: its quants go in offset by 128 (w + 128, unsigned) and the offset's
// products, 128 sum(q), come off again, all in exact integers.
inline __m512i load_pair(const uint8_t* a, const uint8_t* b) {  // 32 bytes of each group's record
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

inline __m512 halves_pair(const uint8_t* a, const uint8_t* b) {  // 8 float16 of each group's record
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1));
}

inline __m512i broadcast4_wide(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int64_t QT, int PLANES, int MT>
inline void pair_block_dots(const uint8_t* qa, const uint8_t* qb, const int8_t* const xq[MT], const int32_t qsum[MT],
                            __m512i dots[MT]) {
  __m512i sums[MT][PLANES];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < PLANES; ++p) sums[m][p] = _mm512_setzero_si512();
  if constexpr (QT == Q8_0) {
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < 8; ++c) {
      const __m512i w = _mm512_xor_si512(load_pair(qa + 32 * c, qb + 32 * c), offset);  // w + 128
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p)
          sums[m][p] = _mm512_dpbusd_epi32(sums[m][p], w, broadcast4_wide(xq[m] + p * kBlock + 4 * c));
    }
  } else {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = load_pair(qa + 32 * c, qb + 32 * c);
      const __m512i lo = _mm512_and_si512(raw, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p) {
          const int8_t* x = xq[m] + p * kBlock;
          sums[m][p] = _mm512_dpbusd_epi32(sums[m][p], lo, broadcast4_wide(x + 4 * c));
          sums[m][p] = _mm512_dpbusd_epi32(sums[m][p], hi, broadcast4_wide(x + 16 + 4 * c));
        }
    }
  }
  for (int m = 0; m < MT; ++m) {
    dots[m] = sums[m][0];
    if constexpr (PLANES == 2)
      dots[m] = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(dots[m], 8), dots[m]), sums[m][1]);
    // (w + 128) q summed is w q + 128 sum(q): at most 256 * 32 * 255 * 127 before, inside int32
    if constexpr (QT == Q8_0) dots[m] = _mm512_sub_epi32(dots[m], _mm512_set1_epi32(128 * qsum[m]));
  }
}

// Groups g and g + 1 (16 weight rows) against MT activation rows from m0: y[m0 + m, n0 .. n0 + width).
template <int64_t QT, int PLANES, int MT>
void pair_tile(const uint8_t* ga, const uint8_t* gb, int64_t blocks, const IntRows& xa, int64_t m0, float* y,
               int64_t ldy, int64_t width) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t *ra = ga + b * record_bytes<QT>(), *rb = gb + b * record_bytes<QT>();
    const __m512 d = halves_pair(ra, rb);
    const int8_t* xq[MT];
    int32_t qsum[MT];
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      xq[m] = xa.q.data() + i * PLANES * kBlock;
      qsum[m] = xa.qsum[i];
    }
    __m512i dots[MT];
    pair_block_dots<QT, PLANES, MT>(ra + quant_offset<QT>(), rb + quant_offset<QT>(), xq, qsum, dots);
    __m512 minimum = _mm512_setzero_ps();
    if constexpr (QT == Q4_1) minimum = halves_pair(ra + 16, rb + 16);
    if constexpr (QT == Q4_0) minimum = _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m]), _mm512_mul_ps(d, _mm512_set1_ps(xa.scale[i])), acc[m]);
      if constexpr (QT != Q8_0) acc[m] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xa.sum[i]), acc[m]);
    }
  }
  const __mmask16 lanes = width >= 2 * kGroup ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
  for (int m = 0; m < MT; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * ldy, lanes, acc[m]);
}

template <int64_t QT, int PLANES, int MT>
inline void partial_pair_tile(int64_t rows, const uint8_t* ga, const uint8_t* gb, int64_t blocks, const IntRows& xa,
                              int64_t m0, float* y, int64_t ldy, int64_t width) {
  if constexpr (MT > 1)
    if (rows < MT) return partial_pair_tile<QT, PLANES, MT - 1>(rows, ga, gb, blocks, xa, m0, y, ldy, width);
  pair_tile<QT, PLANES, MT>(ga, gb, blocks, xa, m0, y, ldy, width);
}
// The rows from which pairs pay: Q8_0 (the head) from one; Q4 from 4 (below, a single 4-bit row
// ran 1.4-1.7 ms of smollm2's layer matmuls a step in 256-bit groups and 2.0 ms in pairs)
template <int64_t QT>
constexpr int64_t kPairRows = QT == Q8_0 ? 1 : 4;
#define LLMASOS_GROUP_PAIRS
#endif

// Groups [g_begin, g_end): each group's records are read from memory once and from L1 for each later
// tile of activation rows (kTileRows of 8 bits, half as many of 16).
template <int64_t QT, int PLANES>
void groups_kernel(const uint8_t* wp, int64_t g_begin, int64_t g_end, int64_t blocks, const IntRows& xa,
                   int64_t rows, float* y, int64_t out_features) {
  constexpr int kTile = kTileRows / PLANES;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* group = wp + g * blocks * record_bytes<QT>();
    const int64_t width = std::min(2 * kGroup, out_features - g * kGroup);
    float* yg = y + g * kGroup;
#ifdef LLMASOS_GROUP_PAIRS
    if (g + 1 < g_end && rows >= kPairRows<QT>) {
      for (int64_t m0 = 0; m0 < rows; m0 += kTile)
        partial_pair_tile<QT, PLANES, kTile>(std::min<int64_t>(rows - m0, kTile), group,
                                             group + blocks * record_bytes<QT>(), blocks, xa, m0, yg, out_features,
                                             width);
      ++g;
      continue;
    }
#endif
    for (int64_t m0 = 0; m0 < rows; m0 += kTile)
      partial_tile<QT, PLANES, kTile>(std::min<int64_t>(rows - m0, kTile), group, blocks, xa, m0, yg, out_features,
                                      std::min(width, kGroup));
  }
}

template <int64_t QT>
void run_groups(const uint8_t* wp, int64_t g_begin, int64_t g_end, int64_t blocks, const IntRows& xa, int64_t rows,
                float* y, int64_t out_features) {
  if (xa.planes == 2)
    groups_kernel<QT, 2>(wp, g_begin, g_end, blocks, xa, rows, y, out_features);
  else
    groups_kernel<QT, 1>(wp, g_begin, g_end, blocks, xa, rows, y, out_features);
}

#endif  // x86

void check_packed(const torch::Tensor& w, int64_t qtype, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(qtype == Q8_0 || qtype == Q4_0 || qtype == Q4_1, "unsupported GGUF type ", qtype);
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 records");
  TORCH_CHECK(in_features % kBlock == 0, "in_features must be a multiple of 32");
  TORCH_CHECK(w.size(0) == (out_features + kGroup - 1) / kGroup &&
                  w.size(1) == in_features / kBlock * packed_record_bytes(qtype),
              "w is not in the packed layout of this type and shape (ops/quant.py pack_blocks)");
}

}  // namespace

// Few rows (decode): y = x @ W^T with W in the packed layout, activations rounded to integers of
// activation_bits (8 or 16) per block. x may be a strided view of rows (e.g. one half of a packed
// gate/up output).
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features,
                          int64_t activation_bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in_features, "x must be [M, K] float32");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, "activation_bits must be 8 or 16");
  check_packed(w, qtype, in_features, out_features);
  if (x.stride(1) != 1 || x.stride(0) < in_features) x = x.contiguous();
  const int64_t rows = x.size(0), blocks = in_features / kBlock, groups = w.size(0);
  auto y = torch::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const IntRows xa =
      quantize_rows(x.data_ptr<float>(), rows > 1 ? x.stride(0) : in_features, rows, blocks, activation_bits);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // split over groups of output rows: each thread reads one contiguous run of records and writes its
  // own columns of y; for one row, below 8 groups (64 outputs) a second thread is not worth waking
  at::parallel_for(0, groups, std::max<int64_t>(1, 8 / rows), [&](int64_t begin, int64_t end) {
    if (qtype == Q4_1)
      run_groups<Q4_1>(wp, begin, end, blocks, xa, rows, yp, out_features);
    else if (qtype == Q8_0)
      run_groups<Q8_0>(wp, begin, end, blocks, xa, rows, yp, out_features);
    else
      run_groups<Q4_0>(wp, begin, end, blocks, xa, rows, yp, out_features);
  });
  return y;
}

// Packed records -> float32 rows [out_features, in_features], exactly as gguf-py dequantizes them.
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features) {
  check_packed(w, qtype, in_features, out_features);
  const int64_t blocks = in_features / kBlock, row_bytes = blocks * gguf_block_bytes(qtype);
  const int64_t group_bytes = blocks * packed_record_bytes(qtype);
  auto out = torch::empty({out_features, in_features}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.size(0), 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(kGroup * row_bytes);
    for (int64_t g = begin; g < end; ++g) {
      unpack_group(wp + g * group_bytes, qtype, blocks, rows.data());
      for (int64_t r = 0; r < std::min(kGroup, out_features - g * kGroup); ++r)
        dequantize_row(rows.data() + r * row_bytes, qtype, blocks, op + (g * kGroup + r) * in_features);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_linear", &gguf_linear, "y = x @ dequantize(w)^T for w in the packed layout");
  m.def("gguf_dequantize", &gguf_dequantize, "packed records -> float32 rows");
#if !defined(__aarch64__)  // the other files are x86 only: the ARM build is the block kernel alone
  register_decode_stack(m);
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding, in place");
  m.def("store_kv", &store_kv, "write new K/V rows into the paged cache");
  m.def("lora_bgmv", &lora_bgmv, "y[:, offsets[h]:] += each row's LoRA update through shard h of its slot");
  m.def("decode_attention", &decode_attention, "one-token attention straight from the paged cache");
#endif
}
