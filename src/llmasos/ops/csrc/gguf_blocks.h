// What every build of the GGUF block kernel shares, torch-free: the packed layout the kernel reads,
// and the activations rounded to integers it multiplies them with. gguf_linear.cpp builds on it (its
// x86 code, and on ARM gguf_neon.h), and so does tests/ops/csrc/neon_harness.cpp, which runs the
// ARM code without torch (under qemu on x86).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace gguf {

constexpr int64_t kBlock = 32;
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml type ids

// ---- the packed layout (ops/quant.py `pack_blocks` writes it; the tests check both agree) --------
// Rows go in groups of 8 (the last padded with zero blocks). A group stores, block by block, a record:
// the 8 rows' float16 scales d (16 bytes), for Q4_1 their minimums m (16 bytes), then the quants in
// chunks of 32 bytes, each holding 4 consecutive bytes of every row (row 0's, then row 1's, ...).
// One 256-bit load (x86; two 128-bit ones on ARM) is then 4 quants of 8 rows; multiplied by 4
// activations broadcast to all lanes, each 32-bit lane sums one row's products, so the 8 rows' dot
// products come out in one register with no horizontal sums, and the scales multiply 8 rows at once.
constexpr int64_t kGroup = 8;

template <int64_t QT>
constexpr int64_t quant_offset() {
  return QT == Q4_1 ? 32 : 16;
}

template <int64_t QT>
constexpr int64_t record_bytes() {
  return quant_offset<QT>() + (QT == Q8_0 ? 256 : 128);
}

inline int64_t gguf_block_bytes(int64_t qtype) { return qtype == Q8_0 ? 34 : qtype == Q4_0 ? 18 : 20; }

inline int64_t packed_record_bytes(int64_t qtype) {
  return qtype == Q8_0 ? record_bytes<Q8_0>() : qtype == Q4_0 ? record_bytes<Q4_0>() : record_bytes<Q4_1>();
}

// One group's records back to its 8 rows of GGUF blocks (for dequantizing).
inline void unpack_group(const uint8_t* group, int64_t qtype, int64_t blocks, uint8_t* rows) {
  const int64_t bb = gguf_block_bytes(qtype), rb = packed_record_bytes(qtype);
  const int64_t header = qtype == Q4_1 ? 4 : 2, quants = bb - header;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* rec = group + b * rb;
    for (int64_t r = 0; r < kGroup; ++r) {
      uint8_t* out = rows + (r * blocks + b) * bb;
      for (int64_t h = 0; h < header / 2; ++h) std::memcpy(out + 2 * h, rec + 16 * h + 2 * r, 2);
      for (int64_t c = 0; c < quants / 4; ++c) std::memcpy(out + header + 4 * c, rec + 16 * (header / 2) + 32 * c + 4 * r, 4);
    }
  }
}

// ---- activations as integers: each block of 32 inputs as x ~ scale * q -------------------------
// The products with the weights' quants are then integers, exact, and one instruction makes many of
// them: AVX2's _mm256_maddubs_epi16 32 (unsigned byte x signed byte), twice _mm256_madd_epi16's 16,
// or an FMA's 8 (measured on a Zen 1 EPYC: 40 vs 20 GMAC/s a core); VNNI's vpdpbusd and ARM's sdot
// add groups of 4 byte products straight into int32 lanes.
// - 8 bits: q in [-127, 127], llama.cpp's Q8 activations; each x moves by up to half a step of
//   max|x_block| / 127, enough to change a greedy token of a small model now and then.
// - 16 bits: q = 255 hi + lo in [-32512, 32512], kept as two planes hi and lo in [-127, 127], each
//   multiplied like the 8-bit one: twice the work, 2^-15 of max|x_block| (float32 keeps 2^-24);
//   greedy decoding gives the float model's tokens except where its top two are within ~0.01
//   (tests/test_smollm2.py).
// Every product is then w x_rounded, exactly: Q4's constant part (m, or -8 d) multiplies the sum of
// the rounded x, scale * sum(q), as llama.cpp's Q8_1 does (the float sum would pair rounded x with
// d q alone, whose error grows with q).
// Every build rounds the same way (x * (qmax / max|x_block|) to nearest, ties to even; hi = the same
// rounding of q * (1 / 255.f)) and then, per block in order, acc = fma(float(dot), d * scale, acc)
// and for Q4 acc = fma(minimum, sum, acc): the same floats bit for bit on every CPU.
struct IntRows {
  int64_t planes;             // 1 (8 bits) or 2 (16 bits: hi, then lo)
  std::vector<int8_t> q;      // [rows, blocks, planes, 32]
  std::vector<float> scale;   // [rows, blocks]
  std::vector<float> sum;     // [rows, blocks]: scale * sum(q), for Q4's constant part (m, or -8 d)
  std::vector<int32_t> qsum;  // [rows, blocks]: sum(q), the x86 512-bit Q8_0 path's offset (empty on ARM)
};

}  // namespace gguf
