// The ARM NEON block kernel (src/llmasos/ops/csrc/gguf_neon.h) without torch, for
// tests/ops/test_neon.py: natively on ARM, under qemu-aarch64 elsewhere.
//
// stdin: cases until its end, each int64 qtype, in_features, out_features, rows, activation_bits,
// then x (rows x in_features float32) and the packed records (ops/quant.py pack_blocks).
// stdout: per case y = x @ W^T (rows x out_features float32), then W dequantized (out_features x
// in_features float32): what gguf_linear.cpp's gguf_linear and gguf_dequantize return.
#include <cstdio>
#include <vector>

#include "gguf_neon.h"

using namespace gguf;

namespace {

template <typename T>
bool read(std::vector<T>& v) {
  return std::fread(v.data(), sizeof(T), v.size(), stdin) == v.size();
}

template <typename T>
void write(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

}  // namespace

int main() {
  std::vector<int64_t> header(5);
  while (read(header)) {
    const int64_t qtype = header[0], in_features = header[1], out_features = header[2], rows = header[3];
    const int64_t blocks = in_features / kBlock, groups = (out_features + kGroup - 1) / kGroup;
    std::vector<float> x(rows * in_features), y(rows * out_features), w(out_features * in_features);
    std::vector<uint8_t> packed(groups * blocks * packed_record_bytes(qtype));
    if (!read(x) || !read(packed)) {
      std::fprintf(stderr, "input ends inside a case\n");
      return 1;
    }
    const IntRows xa = quantize_rows(x.data(), in_features, rows, blocks, header[4]);
    if (qtype == Q4_1)
      run_groups<Q4_1>(packed.data(), 0, groups, blocks, xa, rows, y.data(), out_features);
    else if (qtype == Q8_0)
      run_groups<Q8_0>(packed.data(), 0, groups, blocks, xa, rows, y.data(), out_features);
    else
      run_groups<Q4_0>(packed.data(), 0, groups, blocks, xa, rows, y.data(), out_features);
    const int64_t row_bytes = blocks * gguf_block_bytes(qtype);
    std::vector<uint8_t> unpacked(kGroup * row_bytes);
    for (int64_t g = 0; g < groups; ++g) {
      unpack_group(packed.data() + g * blocks * packed_record_bytes(qtype), qtype, blocks, unpacked.data());
      for (int64_t r = 0; r < std::min(kGroup, out_features - g * kGroup); ++r)
        dequantize_row(unpacked.data() + r * row_bytes, qtype, blocks, w.data() + (g * kGroup + r) * in_features);
    }
    write(y);
    write(w);
  }
  return 0;
}
