// BGMV: each row of a batch through its own LoRA adapter (float32, AVX2), Punica's batched
// gather matrix-vector product on the CPU, for decode rows and prefill rows alike.
//
// Why: a batch that mixes adapters cannot share one matmul for the LoRA update, and gathering each
// row's A and B into a batched matmul copies r * (in + out) floats per row and projection. Here the
// adapters' A and B are read in place from the stacked slots (ops/lora.py), once per call for all
// the rows that use the same slot (a decode batch of 16 rows over 8 adapters reads 8, not 16; a
// prefill chunk of 500 rows reads its one adapter once), and every shard of a projection (q, k, v
// of qkv; gate, up) goes in the same call. The shrink s = A[slot] x takes up to 4 rows at a time, so
// each row of A is loaded once per 4 rows; the expand y += s B[slot] (B stored transposed, so its r rows
// are contiguous) keeps 8 columns of y in a register across all r, by column blocks of B that stay
// in L1 across the slot's rows. A prefill step of 16 requests used to be 32 small matmuls per shard
// (SGMV, ~20 ms a projection under load), now one pass. One thread: the work is a few percent of
// the base matmul's, and an OpenMP region per projection (7 a layer) cost more than it saved: its
// barriers stall on a busy machine (3x slower steps).
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

LoraRows lora_rows(const torch::Tensor& indices, int64_t slots) {
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.device().is_cpu(),
              "one int64 CPU slot index per row");
  const int64_t rows = indices.numel();
  const torch::Tensor held = indices.contiguous();
  const int64_t* idx = held.data_ptr<int64_t>();
  LoraRows out;
  out.start.assign(slots + 1, 0);
  for (int64_t t = 0; t < rows; ++t) {
    TORCH_CHECK(idx[t] < slots, "row ", t, ": slot ", idx[t], " of ", slots);
    if (idx[t] >= 0) ++out.start[idx[t] + 1];  // (-1: a row without an adapter)
  }
  for (int64_t s = 0; s < slots; ++s) out.start[s + 1] += out.start[s];
  out.order.resize(out.start[slots]);
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  for (int64_t t = 0; t < rows; ++t)
    if (idx[t] >= 0) out.order[fill[idx[t]]++] = t;
  out.rows = rows;
  return out;
}

namespace {

// s[i * stride + r] = A_r . x_i for T rows x_0..x_{T-1} at once: each row of A loaded once for all T
template <int T>
void shrink_tile(const float* a, int64_t rank, int64_t k, const float* const* x, float* s, int64_t stride) {
  for (int64_t r = 0; r < rank; ++r) {
    const float* ar = a + r * k;
    __m256 acc[T];
    for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      const __m256 av = _mm256_loadu_ps(ar + j);
      for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(av, _mm256_loadu_ps(x[i] + j), acc[i]);
    }
    for (int i = 0; i < T; ++i) {
      float d = hsum(acc[i]);
      for (int64_t jj = j; jj < k; ++jj) d += ar[jj] * x[i][jj];
      s[i * stride + r] = d;
    }
  }
}

// the shrink of one slot's rows, 4 at a time (a decode batch's 1-3 rows of a slot as one tile too)
void shrink(const float* a, int64_t rank, int64_t k, const float* xp, int64_t xs, const int64_t* rows, int64_t count,
            float* s, int64_t stride) {
  for (int64_t i = 0; i < count; i += 4) {
    const float* x[4];
    const int64_t tile = std::min<int64_t>(4, count - i);
    for (int64_t t = 0; t < tile; ++t) x[t] = xp + rows[i + t] * xs;
    float* si = s + i * stride;
    switch (tile) {
      case 4: shrink_tile<4>(a, rank, k, x, si, stride); break;
      case 3: shrink_tile<3>(a, rank, k, x, si, stride); break;
      case 2: shrink_tile<2>(a, rank, k, x, si, stride); break;
      default: shrink_tile<1>(a, rank, k, x, si, stride);
    }
  }
}

// y_{rows[i]}[c0:c1] += sum_r s[i * stride + r] B_r[c0:c1] (B_r's columns, y's from y_col)
void expand(const float* b, int64_t rank, int64_t n, int64_t c0, int64_t c1, const float* s, int64_t stride,
            const int64_t* rows, int64_t count, float* yp, int64_t ys, int64_t y_col) {
  for (int64_t i = 0; i < count; ++i) {
    const float* si = s + i * stride;
    float* yr = yp + rows[i] * ys + y_col;
    int64_t j = c0;
    for (; j + 8 <= c1; j += 8) {
      __m256 acc = _mm256_loadu_ps(yr + j);
      for (int64_t r = 0; r < rank; ++r)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(si[r]), _mm256_loadu_ps(b + r * n + j), acc);
      _mm256_storeu_ps(yr + j, acc);
    }
    for (; j < c1; ++j) {
      float acc = yr[j];
      for (int64_t r = 0; r < rank; ++r) acc += si[r] * b[r * n + j];
      yr[j] = acc;
    }
  }
}

}  // namespace

void lora_apply(torch::Tensor& y, const torch::Tensor& x, const std::vector<torch::Tensor>& a,
                const std::vector<torch::Tensor>& b, const std::vector<int64_t>& offsets, const LoraRows& groups) {
  TORCH_CHECK(!a.empty() && a.size() == b.size() && a.size() == offsets.size(), "one A, B and offset per shard");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == groups.rows && y.size(0) == groups.rows,
              "y [T, Ny] and x [T, K] with one slot index per row");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "float32 tensors");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "contiguous rows");
  const int64_t k = x.size(1), slots = static_cast<int64_t>(groups.start.size()) - 1;
  int64_t total_rank = 0;
  for (size_t h = 0; h < a.size(); ++h) {
    TORCH_CHECK(a[h].dim() == 3 && b[h].dim() == 3, "shard ", h, ": a [S, R, K], b [S, R, N]");
    TORCH_CHECK(a[h].scalar_type() == at::kFloat && b[h].scalar_type() == at::kFloat, "float32 tensors");
    TORCH_CHECK(a[h].is_contiguous() && b[h].is_contiguous(), "contiguous slots");
    TORCH_CHECK(a[h].size(2) == k && b[h].size(1) == a[h].size(1), "shard ", h, ": A of x's width, B of A's rank");
    TORCH_CHECK(a[h].size(0) == slots && b[h].size(0) == slots, "shard ", h, ": ", slots, " slots");
    TORCH_CHECK(offsets[h] >= 0 && offsets[h] + b[h].size(2) <= y.size(1), "the update's columns lie inside y");
    total_rank += a[h].size(1);
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  std::vector<float> s;
  constexpr int64_t kBlock = 256;  // columns of B per pass: R rows of them stay in L1 across the rows
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t* rows = groups.order.data() + groups.start[slot];
    const int64_t count = groups.start[slot + 1] - groups.start[slot];
    if (count == 0) continue;
    s.resize(count * total_rank);
    int64_t r0 = 0;  // every shard's shrink first: s holds [count, total_rank]
    for (size_t h = 0; h < a.size(); ++h) {
      const int64_t rank = a[h].size(1);
      shrink(a[h].data_ptr<float>() + slot * rank * k, rank, k, xp, xs, rows, count, s.data() + r0, total_rank);
      r0 += rank;
    }
    r0 = 0;
    for (size_t h = 0; h < b.size(); ++h) {
      const int64_t rank = b[h].size(1), n = b[h].size(2);
      const float* bs = b[h].data_ptr<float>() + slot * rank * n;
      for (int64_t c0 = 0; c0 < n; c0 += kBlock)
        expand(bs, rank, n, c0, std::min(n, c0 + kBlock), s.data() + r0, total_rank, rows, count, yp, ys, offsets[h]);
      r0 += rank;
    }
  }
}

void lora_bgmv(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
               std::vector<int64_t> offsets, torch::Tensor indices) {
  TORCH_CHECK(!a.empty(), "at least one shard");
  lora_apply(y, x, a, b, offsets, lora_rows(indices, a[0].size(0)));
}
