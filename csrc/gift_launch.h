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
constexpr int kBlockRows = 64;  // rows of the long operand per block (M for t/dt/y, N for dB, K for dx/dpsi)
constexpr int kStep = 32;       // depth of one staged step along the split dimension

// Rank padded to a kernel instantiation: 16, 32 or 64.
inline int padded_rank(int rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : 64; }

// out[s] (rows_pad x RP, float) = A[:, slice s] S[slice s, :]: partial sums of the skinny
// products t = x psi^T (A = x, S = psi^T given as psi: s_rank_major) and dt = g B (A = g, S = B).
struct SkinnyArgs {
  DType dtype;
  int64_t rows, len;  // A is rows x len, S is len x rank
  int rank;
  const void* a; int64_t lda;
  const void* s; int64_t lds;  // len x rank, or rank x len when s_rank_major
  bool s_rank_major;
  float* out; int64_t out_rows;
  int64_t per_split;  // columns of A per blockIdx.y
  int splits;
};

// y (+)= t B^T (+ bias) and t cast to the compute dtype, from the float t of launch_skinny.
struct EpilogueArgs {
  DType dtype;
  int64_t M, N;
  int rank;
  const float* t32; int64_t ldt32;  // M x rank, float
  const void* B; int64_t ldb;       // N x rank, compute dtype
  const void* bias;                 // N, or null
  void* t; int64_t ldt;             // M x rank (output, compute dtype)
  void* y; int64_t ldy;             // M x N (output)
  bool accumulate;                  // y += instead of y = (rank windows after the first)
  int64_t n_per_split;              // columns of y per blockIdx.y
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

// How many blocks a launch should aim for: about as many as fit on the current device at
// once (4 per SM), so that enough loads are in flight to stream at memory bandwidth.
int target_blocks();

// Each launcher instantiates its kernel for padded_rank(rank) (padded_rank(rank + 1) for
// launch_db with colsum), the row stride of its `out` partials.
void launch_skinny(const SkinnyArgs& a);
void launch_epilogue(const EpilogueArgs& a);
void launch_db(const DbArgs& a);
void launch_dx(const DxArgs& a);
// out[i] = sum_{p < count} parts[p * n + i]
void launch_sum_partials(const float* parts, int64_t count, int64_t n, float* out);

}  // namespace gift
