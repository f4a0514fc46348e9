// The boundary between the torch glue (gift_ops.cpp) and the kernels (gift_launch.cu):
// plain structs of pointers, sizes and strides, no torch and no CUDA types, so the glue
// compiles without nvcc and the same glue drives the CPU emulation build.
//
// Every matrix is row-major with the given row stride (elements); ranks are per launch
// (a rank window of at most kMaxRank columns, see gift_ops.cpp).
//
// `wide` (epilogue, db, dx): the rank-r factors t, dt, dB are multiplied in float instead of the
// compute dtype: set for fp16 x with a float32 rank path (gift_kernels/ops/dtypes.py), where
// those factors may exceed fp16's range. The rank-path operands marked "operand dtype" below
// are then float, else the compute dtype.
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
  DType dtype = DType::kFloat32;
  int64_t rows = 0, len = 0;  // A is rows x len, S is len x rank
  int rank = 0;
  const void* a = nullptr; int64_t lda = 0;
  const void* s = nullptr; int64_t lds = 0;  // len x rank, or rank x len when s_rank_major
  bool s_rank_major = false;
  float* out = nullptr; int64_t out_rows = 0;
  int64_t per_split = 0;  // columns of A per blockIdx.y
  int splits = 0;
};

// y (+)= t B^T (+ bias) (+ add) and t cast to the compute dtype, from the float t of
// launch_skinny. The input-side form writes u = x + t phi^T with B = phi and add = x.
struct EpilogueArgs {
  DType dtype = DType::kFloat32;
  bool wide = false;
  int64_t M = 0, N = 0;
  int rank = 0;
  const float* t32 = nullptr; int64_t ldt32 = 0;  // M x rank, float
  const void* B = nullptr; int64_t ldb = 0;  // N x rank, operand dtype
  const void* bias = nullptr;  // N, or null
  void* t = nullptr; int64_t ldt = 0;  // M x rank (output, compute dtype), or null: t not written
  const void* add = nullptr; int64_t ldadd = 0;  // M x N addend in the compute dtype, or null
  void* y = nullptr; int64_t ldy = 0;  // M x N (output)
  bool accumulate = false;  // y += instead of y = (rank windows after the first)
  int64_t n_per_split = 0;  // columns of y per blockIdx.y
  int n_splits = 0;
};

// out[s] (N_pad x RP, float) = g[slice s, :]^T [t | 1][slice s, :]: partial sums of dB = g^T t,
// and of db = sum_m g in column `rank` when colsum is set.
struct DbArgs {
  DType dtype = DType::kFloat32;
  bool wide = false;
  int64_t M = 0, N = 0;
  int rank = 0;
  bool colsum = false;
  const void* g = nullptr; int64_t ldg = 0;  // M x N, compute dtype
  const void* t = nullptr; int64_t ldt = 0;  // M x rank, operand dtype
  float* out = nullptr; int64_t out_rows = 0;
  int64_t m_per_split = 0;
  int m_splits = 0;
};

// dx (+)= dt psi (+ add) (if dx), and out[s] (K_pad x RP, float) = x[slice s, :]^T dt[slice s, :]:
// partial sums of dpsi^T (if out).
struct DxArgs {
  DType dtype = DType::kFloat32;
  bool wide = false;
  int64_t M = 0, K = 0;
  int rank = 0;
  const float* dt = nullptr; int64_t lddt = 0;  // M x rank
  const void* psi = nullptr; int64_t ldpsi = 0;  // rank x K, operand dtype
  const void* x = nullptr; int64_t ldx = 0;  // M x K
  const void* add = nullptr; int64_t ldadd = 0;  // M x K addend (du of the input-side form), or null
  void* dx = nullptr; int64_t lddx = 0;  // M x K (output) or null
  bool accumulate = false;
  float* out = nullptr; int64_t out_rows = 0;  // or null
  int64_t m_per_split = 0;
  int m_splits = 0;
};

// Each launcher instantiates its kernel for the dtype (and `wide`), padded_rank(rank)
// (padded_rank(rank + 1) for launch_db with colsum), the row stride of its `out` partials,
// launches it on `stream` (a
// cudaStream_t) and returns cudaGetLastError() as an int (0: launched).
int launch_skinny(const SkinnyArgs& a, void* stream);
int launch_epilogue(const EpilogueArgs& a, void* stream);
int launch_db(const DbArgs& a, void* stream);
int launch_dx(const DxArgs& a, void* stream);
// out[i] = sum_{p < count} parts[p * n + i]
int launch_sum_partials(const float* parts, int64_t count, int64_t n, float* out, void* stream);

}  // namespace gift
