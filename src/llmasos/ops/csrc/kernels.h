// The CPU kernels of this extension, declared once for the files that call each other's:
// gguf_linear.cpp (matmuls over GGUF blocks, and the module's bindings), cpu_ops.cpp (the fused
// per-layer ops), decode_stack.cpp (a decode step's layers in one call over both).
#pragma once

#include <torch/extension.h>

#include <vector>

#if !defined(__aarch64__)  // x86: the ARM build (gguf_linear.cpp alone) has no use for it
#include <immintrin.h>

// The sum of a vector's 8 lanes.
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features,
                          int64_t activation_bits);
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features);

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual);
torch::Tensor silu_and_mul(torch::Tensor x);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots);
void decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor rows,
                      torch::Tensor slots, c10::optional<torch::Tensor> mask, double scale, torch::Tensor out);

// The rows of a batch grouped by LoRA slot (lora.cpp): slot s's rows are order[start[s]:start[s + 1]].
struct LoraRows {
  std::vector<int64_t> order, start;
  int64_t rows = 0;
};
LoraRows lora_rows(const torch::Tensor& indices, int64_t slots);
// y[:, offsets[h]:] += each row's update through shard h of its slot, every shard of a projection at once
void lora_apply(torch::Tensor& y, const torch::Tensor& x, const std::vector<torch::Tensor>& a,
                const std::vector<torch::Tensor>& b, const std::vector<int64_t>& offsets, const LoraRows& groups);
void lora_bgmv(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
               std::vector<int64_t> offsets, torch::Tensor indices);

void register_decode_stack(pybind11::module& m);
