// The GGUF block kernel on ARM: NEON with the dot-product instructions (armv8.2-a+dotprod: Apple
// silicon, AWS Graviton 2 and later, Ampere Altra). Torch-free, over raw pointers: gguf_linear.cpp's
// bindings call it in the ARM build, and tests/ops/csrc/neon_harness.cpp calls it alone (under qemu
// on x86: tests/ops/test_neon.py).
//
// It gives the x86 builds' floats bit for bit: the same packed layout and rounding of activations
// (gguf_blocks.h), the same exact integer dot products, the same float operations in the same order.
// sdot (vdotq_laneq_s32) adds 4 signed byte products into each int32 lane: one 16-byte half of a
// record's chunk (4 quants of 4 rows) against 4 activations picked by lane from a register. Signed
// times signed, so Q8_0 needs none of AVX2's |w| and sign(x, w) (a quant of -128 is just -128).
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "gguf_blocks.h"

#if !defined(__ARM_FEATURE_DOTPROD)
#error "the NEON block kernel needs the dot-product instructions: compile with -march=armv8.2-a+dotprod"
#endif

namespace gguf {

// 4 float16 -> 4 float32 (exact)
inline float32x4_t load_halves(const uint8_t* p) {
  uint16_t h[4];
  std::memcpy(h, p, 8);
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

// f(std::integral_constant<int, C>) for each C of the sequence: a lane index must be a constant
template <typename F, int... C>
inline void for_lanes(F&& f, std::integer_sequence<int, C...>) {
  (f(std::integral_constant<int, C>{}), ...);
}

// A Q4 block's 16 bytes of quants (byte j: element j in its low nibble, j + 16 in its high) -> its
// 32 floats: d (q - 8) (Q4_0), or d q + m (Q4_1)
inline void dequantize_nibbles(const uint8_t* qs, float d, float m, bool offset8, float* out) {
  const uint8x16_t bytes = vld1q_u8(qs);
  const uint8x16_t halves[2] = {vandq_u8(bytes, vdupq_n_u8(0x0F)), vshrq_n_u8(bytes, 4)};
  for (int h = 0; h < 2; ++h) {
    const int16x8_t wide[2] = {vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(halves[h]))),
                               vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(halves[h])))};
    for (int part = 0; part < 4; ++part) {
      const int16x8_t w = wide[part / 2];
      int32x4_t q = vmovl_s16(part % 2 ? vget_high_s16(w) : vget_low_s16(w));
      if (offset8) q = vsubq_s32(q, vdupq_n_s32(8));
      float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(q), d);
      if (!offset8) v = vaddq_f32(v, vdupq_n_f32(m));  // d * q + m, two roundings, as the reference
      vst1q_f32(out + h * 16 + part * 4, v);
    }
  }
}

inline void dequantize_row(const uint8_t* row, int64_t qtype, int64_t blocks, float* out) {
  const auto half = [](const uint8_t* p) {
    __fp16 h;
    std::memcpy(&h, p, 2);
    return static_cast<float>(h);
  };
  for (int64_t b = 0; b < blocks; ++b, out += kBlock) {
    if (qtype == Q8_0) {
      const uint8_t* block = row + b * 34;
      const float d = half(block);
      for (int j = 0; j < kBlock; j += 8) {
        const int16x8_t q = vmovl_s8(vld1_s8(reinterpret_cast<const int8_t*>(block + 2 + j)));
        vst1q_f32(out + j, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), d));
        vst1q_f32(out + j + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(q))), d));
      }
    } else if (qtype == Q4_0) {
      const uint8_t* block = row + b * 18;
      dequantize_nibbles(block + 2, half(block), 0.f, true, out);
    } else {
      const uint8_t* block = row + b * 20;
      dequantize_nibbles(block + 4, half(block), half(block + 2), false, out);
    }
  }
}

// 4 x 4 int32 in [-127, 127] -> 16 int8 in order
inline int8x16_t narrow(const int32x4_t q[4]) {
  return vcombine_s8(vqmovn_s16(vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1]))),
                     vqmovn_s16(vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]))));
}

inline IntRows quantize_rows(const float* x, int64_t ldx, int64_t rows, int64_t blocks, int64_t bits) {
  const int64_t planes = bits == 16 ? 2 : 1;
  const float qmax = planes == 2 ? 255.f * 127.f + 127.f : 127.f;
  IntRows out{planes, std::vector<int8_t>(rows * blocks * planes * kBlock), std::vector<float>(rows * blocks),
              std::vector<float>(rows * blocks)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + m * ldx + b * kBlock;
      float32x4_t v[8];
      for (int j = 0; j < 8; ++j) v[j] = vld1q_f32(xb + 4 * j);
      float32x4_t amax = vabsq_f32(v[0]);
      for (int j = 1; j < 8; ++j) amax = vmaxq_f32(amax, vabsq_f32(v[j]));
      const float largest = vmaxvq_f32(amax);
      const float inv = largest > 0.f ? qmax / largest : 0.f;
      // a NaN or infinity in x makes every output NaN (integers cannot carry it); the sum is the x86
      // code's, in its order (lanes k and k + 4 of its 8-lane halves, then k and k + 2, then 0 and 1),
      // so that a finite block whose sum overflows is NaN on both
      const float32x4_t lanes = vaddq_f32(vaddq_f32(vaddq_f32(v[0], v[2]), vaddq_f32(v[4], v[6])),
                                          vaddq_f32(vaddq_f32(v[1], v[3]), vaddq_f32(v[5], v[7])));
      const float32x2_t pair = vadd_f32(vget_low_f32(lanes), vget_high_f32(lanes));
      const bool finite = std::isfinite(vget_lane_f32(pair, 0) + vget_lane_f32(pair, 1));
      const float scale = finite ? largest / qmax : std::numeric_limits<float>::quiet_NaN();
      int32x4_t q[8];
      for (int j = 0; j < 8; ++j) q[j] = vcvtnq_s32_f32(vmulq_n_f32(v[j], inv));  // nearest, ties to even
      int32x4_t qsum = q[0];
      for (int j = 1; j < 8; ++j) qsum = vaddq_s32(qsum, q[j]);
      out.scale[m * blocks + b] = scale;
      out.sum[m * blocks + b] = scale * static_cast<float>(vaddvq_s32(qsum));  // |sum(q)| < 2^24: exact
      int8_t* q8 = out.q.data() + (m * blocks + b) * planes * kBlock;
      if (planes == 1) {
        vst1q_s8(q8, narrow(q));
        vst1q_s8(q8 + 16, narrow(q + 4));
        continue;
      }
      // hi = round(q / 255) (q / 255 is never a tie: 255 is odd), lo = q - 255 hi, |lo| <= 127
      int32x4_t hi[8], lo[8];
      for (int j = 0; j < 8; ++j) {
        hi[j] = vcvtnq_s32_f32(vmulq_n_f32(vcvtq_f32_s32(q[j]), 1.f / 255.f));
        lo[j] = vmlsq_n_s32(q[j], hi[j], 255);
      }
      vst1q_s8(q8, narrow(hi));
      vst1q_s8(q8 + 16, narrow(hi + 4));
      vst1q_s8(q8 + kBlock, narrow(lo));
      vst1q_s8(q8 + kBlock + 16, narrow(lo + 4));
    }
  }
  return out;
}

// For one block and MT activation rows: the integer dot products of the group's 8 rows, rows 0-3 in
// dots[m][0] and 4-7 in dots[m][1]. Chunk c holds quants 4c..4c+3 (Q8_0; Q4: low nibbles 4c..4c+3,
// high ones 16+4c..16+4c+3), whose activations are lane c % 4 of x's 16-byte half c / 4 (Q4: 0, 1).
template <int64_t QT, int PLANES, int MT>
inline void block_dots(const uint8_t* quants, const int8_t* const xq[MT], int32x4_t dots[MT][2]) {
  int32x4_t sums[MT][PLANES][2];
  for (int m = 0; m < MT; ++m)
    for (int p = 0; p < PLANES; ++p) sums[m][p][0] = sums[m][p][1] = vdupq_n_s32(0);
  // w: 16 bytes of a chunk (one half of the rows); xv: the activations' 16-byte half it meets
  const auto dot = [&](int m, int p, int half, int8x16_t w, int8x16_t xv, auto lane) {
    sums[m][p][half] = vdotq_laneq_s32(sums[m][p][half], w, xv, decltype(lane)::value);
  };
  const auto chunks = std::make_integer_sequence<int, 4>{};  // lanes 0..3
  if constexpr (QT == Q8_0) {
    for (int part = 0; part < 2; ++part) {
      int8x16_t x[MT][PLANES];
      for (int m = 0; m < MT; ++m)
        for (int p = 0; p < PLANES; ++p) x[m][p] = vld1q_s8(xq[m] + p * kBlock + 16 * part);
      for_lanes([&](auto c) {
        const uint8_t* chunk = quants + 32 * (4 * part + decltype(c)::value);
        const int8x16_t w0 = vld1q_s8(reinterpret_cast<const int8_t*>(chunk));
        const int8x16_t w1 = vld1q_s8(reinterpret_cast<const int8_t*>(chunk + 16));
        for (int m = 0; m < MT; ++m)
          for (int p = 0; p < PLANES; ++p) {
            dot(m, p, 0, w0, x[m][p], c);
            dot(m, p, 1, w1, x[m][p], c);
          }
      }, chunks);
    }
  } else {
    int8x16_t x[MT][PLANES][2];
    for (int m = 0; m < MT; ++m)
      for (int p = 0; p < PLANES; ++p)
        for (int part = 0; part < 2; ++part) x[m][p][part] = vld1q_s8(xq[m] + p * kBlock + 16 * part);
    const uint8x16_t nibble = vdupq_n_u8(0x0F);
    for_lanes([&](auto c) {
      const uint8_t* chunk = quants + 32 * decltype(c)::value;
      for (int half = 0; half < 2; ++half) {
        const uint8x16_t raw = vld1q_u8(chunk + 16 * half);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, nibble));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        for (int m = 0; m < MT; ++m)
          for (int p = 0; p < PLANES; ++p) {
            dot(m, p, half, lo, x[m][p][0], c);
            dot(m, p, half, hi, x[m][p][1], c);
          }
      }
    }, chunks);
  }
  for (int m = 0; m < MT; ++m)
    for (int half = 0; half < 2; ++half)  // q = 255 hi + lo (at most 255 * 32 * 128 * 127: inside int32)
      dots[m][half] = PLANES == 2 ? vmlaq_n_s32(sums[m][PLANES - 1][half], sums[m][0][half], 255) : sums[m][0][half];
}

// One group of 8 weight rows against MT activation rows from m0: y[m0 + m, n0 .. n0 + width).
template <int64_t QT, int PLANES, int MT>
void group_tile(const uint8_t* group, int64_t blocks, const IntRows& xa, int64_t m0, float* y, int64_t ldy,
                int64_t width) {
  float32x4_t acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* rec = group + b * record_bytes<QT>();
    const float32x4_t d[2] = {load_halves(rec), load_halves(rec + 8)};
    const int8_t* xq[MT];
    for (int m = 0; m < MT; ++m) xq[m] = xa.q.data() + ((m0 + m) * blocks + b) * PLANES * kBlock;
    int32x4_t dots[MT][2];
    block_dots<QT, PLANES, MT>(rec + quant_offset<QT>(), xq, dots);
    float32x4_t minimum[2] = {};  // w = d q + minimum (Q4_0: d (q - 8))
    for (int h = 0; h < 2; ++h) {
      if constexpr (QT == Q4_1) minimum[h] = load_halves(rec + 16 + 8 * h);
      if constexpr (QT == Q4_0) minimum[h] = vmulq_n_f32(d[h], -8.f);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      for (int h = 0; h < 2; ++h) {
        acc[m][h] = vfmaq_f32(acc[m][h], vcvtq_f32_s32(dots[m][h]), vmulq_n_f32(d[h], xa.scale[i]));
        if constexpr (QT != Q8_0) acc[m][h] = vfmaq_n_f32(acc[m][h], minimum[h], xa.sum[i]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float lanes[kGroup];
    vst1q_f32(lanes, acc[m][0]);
    vst1q_f32(lanes + 4, acc[m][1]);
    std::memcpy(y + (m0 + m) * ldy, lanes, width * sizeof(float));
  }
}

// Activation rows per pass over a group's records (read from memory once, from L1 for later tiles):
// with the 32 vector registers a tile of 4 rows (8 bits; 2 of 16) holds its accumulators, int32 sums
// and activations in registers.
constexpr int kTileRows = 4;

// A tile of `rows` <= MT activation rows, with the accumulators of exactly that many.
template <int64_t QT, int PLANES, int MT>
inline void partial_tile(int64_t rows, const uint8_t* group, int64_t blocks, const IntRows& xa, int64_t m0, float* y,
                         int64_t ldy, int64_t width) {
  if constexpr (MT > 1)
    if (rows < MT) return partial_tile<QT, PLANES, MT - 1>(rows, group, blocks, xa, m0, y, ldy, width);
  group_tile<QT, PLANES, MT>(group, blocks, xa, m0, y, ldy, width);
}

// Groups [g_begin, g_end) of the packed weights wp against every row of xa: y[rows, out_features].
template <int64_t QT>
void run_groups(const uint8_t* wp, int64_t g_begin, int64_t g_end, int64_t blocks, const IntRows& xa, int64_t rows,
                float* y, int64_t out_features) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* group = wp + g * blocks * record_bytes<QT>();
    const int64_t width = std::min(kGroup, out_features - g * kGroup);
    float* yg = y + g * kGroup;
    const int64_t tile = kTileRows / xa.planes;
    for (int64_t m0 = 0; m0 < rows; m0 += tile) {
      const int64_t n = std::min(rows - m0, tile);
      if (xa.planes == 2)
        partial_tile<QT, 2, kTileRows / 2>(n, group, blocks, xa, m0, yg, out_features, width);
      else
        partial_tile<QT, 1, kTileRows>(n, group, blocks, xa, m0, yg, out_features, width);
    }
  }
}

}  // namespace gguf
