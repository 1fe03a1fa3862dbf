// BGMV: each row of a batch through its own LoRA adapter (float32, AVX2), Punica's batched
// gather matrix-vector product on the CPU.
//
// Why: a batch that mixes adapters cannot share one matmul for the LoRA update, and gathering each
// row's A and B into a batched matmul copies r * (in + out) floats per row and projection. Here each
// row reads its adapter's A and B in place from the stacked slots (ops/lora.py): the shrink
// s = A[slot] x (r dot products) and the expand y += s B[slot] (r rows added, B stored transposed
// so that they are contiguous), with rows split over threads.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

void lora_bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor indices,
               int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && b.dim() == 3 && y.dim() == 2, "y [T, Ny], x [T, K], a [S, R, K], b [S, R, N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  y.scalar_type() == at::kFloat, "float32 tensors");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && x.stride(1) == 1 && y.stride(1) == 1, "contiguous rows");
  const int64_t rows = x.size(0), k = x.size(1), rank = a.size(1), n = b.size(2);
  TORCH_CHECK(a.size(2) == k && b.size(1) == rank && a.size(0) == b.size(0), "a and b of the same slots and rank");
  TORCH_CHECK(indices.numel() == rows && indices.scalar_type() == at::kLong, "one int64 slot index per row");
  TORCH_CHECK(offset >= 0 && offset + n <= y.size(1), "the update's columns lie inside y");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = idx[t];
      if (slot < 0) continue;  // a row without an adapter
      const float* xr = xp + t * xs;
      const float* as = ap + slot * rank * k;
      for (int64_t r = 0; r < rank; ++r) {
        const float* ar = as + r * k;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ar + i), _mm256_loadu_ps(xr + i), acc);
        float sum = hsum(acc);
        for (; i < k; ++i) sum += ar[i] * xr[i];
        s[r] = sum;
      }
      float* yr = yp + t * ys + offset;
      const float* bs = bp + slot * rank * n;
      for (int64_t r = 0; r < rank; ++r) {
        if (s[r] == 0.f) continue;  // the zero padding of a rank below the slots'
        const float* br = bs + r * n;
        const __m256 sr = _mm256_set1_ps(s[r]);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
          _mm256_storeu_ps(yr + j, _mm256_fmadd_ps(sr, _mm256_loadu_ps(br + j), _mm256_loadu_ps(yr + j)));
        for (; j < n; ++j) yr[j] += s[r] * br[j];
      }
    }
  });
}
