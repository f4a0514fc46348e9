// The boundary between the torch glue (gift_ops.cpp) and the kernels (gift_launch.cu):
// plain structs of pointers, sizes and strides, no torch and no CUDA types, so the glue
// compiles without nvcc and the same glue drives the CPU emulation build.
//
// Every matrix is row-major with the given row stride (elements); ranks are per launch
// (a rank window of at most kMaxRank columns, see gift_ops.cpp).
#pragma once

#include <cstdint>

namespace gift {

enum class DType { kFloat32, kFloat16, kBFloat16 };

constexpr int kMaxRank = 64;  // rank columns one launch handles (kernels pad to 16, 32 or 64)
constexpr int kBlockRows = 64;  // rows of the long operand per block (M for fwd/dt, N for dB, K for dx/dpsi)
constexpr int kStep = 32;       // depth of one staged step along the split dimension

// Rank padded to a kernel instantiation: 16, 32 or 64.
inline int padded_rank(int rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : 64; }

// y[:, :] (+)= t B^T (+ bias), t = x psi^T written for the rank window.
struct FwdArgs {
  DType dtype;
  int64_t M, N, K;
  int rank;
  const void* x; int64_t ldx;      // M x K
  const void* psi; int64_t ldpsi;  // rank x K, compute dtype
  const void* B; int64_t ldb;      // N x rank, compute dtype
  const void* bias;                // N, or null
  void* t; int64_t ldt;            // M x rank (output)
  void* y; int64_t ldy;            // M x N (output)
  bool accumulate;                 // y += instead of y = (rank windows after the first)
  int64_t n_per_split;             // columns of y per blockIdx.y
  int n_splits;
};

// out[s] (M_pad x RP, float) = g[:, slice s] B[slice s, :]: partial sums of dt = g B.
struct DtArgs {
  DType dtype;
  int64_t M, N;
  int rank;
  const void* g; int64_t ldg;  // M x N
  const void* B; int64_t ldb;  // N x rank
  float* out; int64_t out_rows;
  int64_t n_per_split;
  int n_splits;
};

// out[s] (N_pad x RP, float) = g[slice s, :]^T [t | 1][slice s, :]: partial sums of dB = g^T t,
// and of db = sum_m g in column `rank` when colsum is set.
struct DbArgs {
  DType dtype;
  int64_t M, N;
  int rank;
  bool colsum;
  const void* g; int64_t ldg;  // M x N
  const void* t; int64_t ldt;  // M x rank
  float* out; int64_t out_rows;
  int64_t m_per_split;
  int m_splits;
};

// dx (+)= dt psi (if dx), and out[s] (K_pad x RP, float) = x[slice s, :]^T dt[slice s, :]:
// partial sums of dpsi^T (if out).
struct DxArgs {
  DType dtype;
  int64_t M, K;
  int rank;
  const float* dt; int64_t lddt;   // M x rank
  const void* psi; int64_t ldpsi;  // rank x K, compute dtype
  const void* x; int64_t ldx;      // M x K
  void* dx; int64_t lddx;          // M x K (output) or null
  bool accumulate;
  float* out; int64_t out_rows;    // or null
  int64_t m_per_split;
  int m_splits;
};

// How many blocks a launch should aim for (twice the SM count of the current device).
int target_blocks();

void launch_fwd(const FwdArgs& a);
// Each launcher instantiates its kernel for padded_rank(rank) (padded_rank(rank + 1) for
// launch_db with colsum), the row stride of its `out` partials.
void launch_dt(const DtArgs& a);
void launch_db(const DbArgs& a);
void launch_dx(const DxArgs& a);
// out[i] = sum_{p < count} parts[p * n + i]
void launch_sum_partials(const float* parts, int64_t count, int64_t n, float* out);

}  // namespace gift
