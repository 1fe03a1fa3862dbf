// BGMV: each row of a batch through its own LoRA adapter (float32, AVX2), Punica's batched
// gather matrix-vector product on the CPU.
//
// Why: a batch that mixes adapters cannot share one matmul for the LoRA update, and gathering each
// row's A and B into a batched matmul copies r * (in + out) floats per row and projection. Here the
// adapters' A and B are read in place from the stacked slots (ops/lora.py), and once per step for
// all the rows that use the same slot (a decode batch of 16 rows over 8 adapters reads 8, not 16):
// the shrink s = A[slot] x (r dot products per row), then the expand y += s B[slot] (B stored
// transposed, so its r rows are contiguous; by column blocks that stay in L1 across rows). One
// thread: the work is a few percent of the base matmul's, and an OpenMP region per projection
// (7 a layer) cost more than it saved: its barriers stall on a busy machine (3x slower steps).
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
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
  const int64_t xs = x.stride(0), ys = y.stride(0), slots = a.size(0);
  std::vector<std::vector<int64_t>> groups(slots);  // the rows of each slot
  for (int64_t t = 0; t < rows; ++t) {
    TORCH_CHECK(idx[t] < slots, "row ", t, ": slot ", idx[t], " of ", slots);
    if (idx[t] >= 0) groups[idx[t]].push_back(t);  // (-1: a row without an adapter)
  }
  std::vector<int64_t> used;
  for (int64_t slot = 0; slot < slots; ++slot)
    if (!groups[slot].empty()) used.push_back(slot);
  std::vector<float> s(rows * rank, 0.f);
  const auto shrink = [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t slot = used[g];
      for (int64_t r = 0; r < rank; ++r) {
        const float* ar = ap + (slot * rank + r) * k;
        for (const int64_t t : groups[slot]) {
          const float* xr = xp + t * xs;
          __m256 acc = _mm256_setzero_ps();
          int64_t i = 0;
          for (; i + 8 <= k; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ar + i), _mm256_loadu_ps(xr + i), acc);
          float sum = hsum(acc);
          for (; i < k; ++i) sum += ar[i] * xr[i];
          s[t * rank + r] = sum;
        }
      }
    }
  };
  shrink(0, used.size());
  constexpr int64_t kBlock = 256;  // columns of y per task: a block of B's rows stays in L1 across rows
  const auto expand = [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kBlock, c1 = std::min(n, c0 + kBlock);
      for (const int64_t slot : used) {
        for (int64_t r = 0; r < rank; ++r) {
          const float* br = bp + (slot * rank + r) * n;
          for (const int64_t t : groups[slot]) {
            const float sr = s[t * rank + r];
            if (sr == 0.f) continue;  // the zero padding of a rank below the slots'
            float* yr = yp + t * ys + offset;
            const __m256 sv = _mm256_set1_ps(sr);
            int64_t j = c0;
            for (; j + 8 <= c1; j += 8)
              _mm256_storeu_ps(yr + j, _mm256_fmadd_ps(sv, _mm256_loadu_ps(br + j), _mm256_loadu_ps(yr + j)));
            for (; j < c1; ++j) yr[j] += sr * br[j];
          }
        }
      }
    }
  };
  expand(0, (n + kBlock - 1) / kBlock);
}
