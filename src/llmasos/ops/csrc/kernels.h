// The CPU kernels of this extension, declared once for the files that call each other's:
// gguf_linear.cpp (matmuls over GGUF blocks, and the module's bindings), cpu_ops.cpp (the fused
// per-layer ops), decode_stack.cpp (a decode step's layers in one call over both).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

// The sum of a vector's 8 lanes.
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features,
                          int64_t activation_bits);
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t qtype, int64_t in_features, int64_t out_features);

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual);
torch::Tensor silu_and_mul(torch::Tensor x);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots);
void decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor rows,
                      torch::Tensor slots, c10::optional<torch::Tensor> mask, double scale, torch::Tensor out);

void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor indices,
               int64_t offset);

void register_decode_stack(pybind11::module& m);
