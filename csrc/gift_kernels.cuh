// GIFT's low-rank kernels. The two big GEMMs (x W^T forward, g W backward) stay in cuBLAS,
// which accumulates onto what these kernels write (beta = 1); everything rank-r is here.
//
//   forward:  gift_skinny_kernel   t = x psi^T                        (x read once)
//             gift_epilogue_kernel y = t B^T + b                      (y written once)
//   backward: gift_skinny_kernel   dt = g B                           (g read once)
//             gift_db_kernel       dB = g^T t, db = g^T 1             (g read once)
//             gift_dx_kernel       dx = dt psi, dpsi^T = x^T dt       (x read once, dx written once)
//             gift_sum_partials_kernel: reduces the split partial sums (r-wide, not M x d)
//
// The input-side form (u = x + t phi^T, any base layer then runs on u) reuses them:
//   forward:  gift_skinny_kernel   t = x psi^T                        (x read once)
//             gift_epilogue_kernel u = x + t phi^T (B = phi, add = x) (x read once, u written once)
//   backward: gift_skinny_kernel   dt = du phi                        (du read once)
//             gift_dx_kernel       dx = du + dt psi, dpsi^T = x^T dt  (du, x read once, dx written once)
//             gift_db_kernel       dphi = du^T t                      (du read once)
//

// The forward is two kernels, not one, so that t's reduction over K can be split across blocks:
// a kernel that also owns whole rows of y has only M / 64 blocks, too few to stream x at
// memory bandwidth at training sizes and a single block at decode. Passes are the same.
//
// Every kernel: 128 threads (4 warps), 64 rows of its long operand per block, warp w owning the
// 16-row strip w of each 64-row tile; tiles staged through shared memory and multiplied with
// gift_tile.cuh (tensor cores for half/bfloat16, FMAs for float). Accumulation is float.
// Rank is a template parameter RP (16, 32, 64): the rank window zero-padded.
//
// Rank-path operand type TR (epilogue, db and dx kernels): the type the M x r / N x r
// factors t, dt, dB are multiplied in. T, except for fp16 x with a float32 rank path
// (`wide`, see gift_launch.h), where TR = float: t = x psi^T may exceed fp16's range where the
// merged layer does not, so those products run on the FMA path in float. The skinny kernel
// always multiplies in T: its rank operand (psi, phi, B) is rounded to T and its products are
// accumulated and written in float, so nothing it makes can overflow.
//
// Splits: when one block per 64-row tile would not fill the GPU, the reduction dimension is
// split over blockIdx.y and each split writes its own float partial (r columns wide), summed by
// gift_sum_partials_kernel. The split sizes come from the glue (gift_ops.cpp), which aims at
// target_blocks() (4 per SM), so partials stay near 4 x SMs x 64 x RP floats whatever M is,
// and the sums are deterministic (no atomics).
#pragma once

#include <cstdint>

#include "gift_launch.h"
#include "gift_tile.cuh"

namespace gift {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRows = kBlockRows;  // 64 = kWarps x 16
constexpr int kFwdCols = 32;       // columns of y per epilogue step
static_assert(kRows == kWarps * kTile, "one 16-row strip per warp");

// Shared-memory rows padded by 16 bytes: keeps WMMA's 16-byte leading-dimension rule and
// staggers rows across banks.
template <typename T>
constexpr int kPad = 16 / static_cast<int>(sizeof(T));
constexpr int kPadF = 4;

// Bytes of an array of n elements of T in a carved shared buffer, rounded to 128 so every
// carved array stays 128-byte aligned (WMMA needs 32).
template <typename T>
constexpr int smem_bytes(int n) {
  return (n * static_cast<int>(sizeof(T)) + 127) / 128 * 128;
}
constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ T* carve(unsigned char* base, int offset) {
  return reinterpret_cast<T*>(base + offset);
}

// Copy the rows x cols tile at (row0, col0) of a global matrix (row stride ld, extent
// n_rows x n_cols) into shared memory (row stride ld_dst), converting to TD and zero-filling
// outside the matrix. Column `ones_col` (if >= 0) is set to 1 on rows inside the matrix: the
// column of ones that turns dB = g^T t into db = g^T 1 as well. All threads take part;
// consecutive threads read consecutive columns.
template <typename TD, typename TS>
__device__ __forceinline__ void stage_tile(TD* dst, int ld_dst, const TS* src, int64_t ld, int64_t row0,
                                           int64_t col0, int64_t n_rows, int64_t n_cols, int rows, int cols,
                                           int ones_col = -1) {
  for (int i = static_cast<int>(threadIdx.x); i < rows * cols; i += kThreads) {
    const int r = i / cols, c = i % cols;
    const int64_t gr = row0 + r, gc = col0 + c;
    float v = 0.0f;
    if (gr < n_rows) {
      if (gc < n_cols)
        v = to_float(src[gr * ld + gc]);
      else if (c == ones_col)
        v = 1.0f;
    }
    dst[r * ld_dst + c] = from_float<TD>(v);
  }
}

template <typename T>
__device__ __forceinline__ T* as(void* p) {
  return static_cast<T*>(p);
}
template <typename T>
__device__ __forceinline__ const T* as(const void* p) {
  return static_cast<const T*>(p);
}

// ---------------------------------------------------------------------------------------------
// Skinny product out[by] = A[rows 64 bx.., slice by] S[slice by, :]: t = x psi^T (forward) and
// dt = g B (backward). Block (bx, by): 64 rows of A, its slice by of A's columns.
// Passes: reads its A tile once (A = x or g). Output: float partial out[by] (r wide).
// S is psi (rank x len, kRankMajor) or B (len x rank).
// ---------------------------------------------------------------------------------------------
template <typename T, int RP, bool kRankMajor>
__global__ void __launch_bounds__(kThreads) gift_skinny_kernel(const SkinnyArgs a) {
  using F = Frag<T>;
  constexpr int P = kPad<T>;
  constexpr int LDA = kStep + P;                          // as_ [kRows][LDA]  A tile
  constexpr int LDS = kRankMajor ? kStep + P : RP + P;    // ss [RP][LDS] ([j][l]) or [kStep][LDS] ([l][j])
  constexpr int kRowsS = kRankMajor ? RP : kStep;
  constexpr int kOffS = smem_bytes<T>(kRows * LDA);
  __shared__ __align__(128) unsigned char smem[kOffS + smem_bytes<T>(kRowsS * LDS)];
  T* as_ = carve<T>(smem, 0);
  T* ss = carve<T>(smem, kOffS);

  const T* A = as<T>(a.a);
  const T* S = as<T>(a.s);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t l_begin = static_cast<int64_t>(blockIdx.y) * a.per_split;
  const int64_t l_end = a.len < l_begin + a.per_split ? a.len : l_begin + a.per_split;

  typename F::Acc acc[RP / kTile];
#pragma unroll
  for (int jt = 0; jt < RP / kTile; ++jt) tile_zero(acc[jt]);
  for (int64_t l0 = l_begin; l0 < l_end; l0 += kStep) {
    stage_tile(as_, LDA, A, a.lda, m0, l0, a.rows, l_end, kRows, kStep);
    if constexpr (kRankMajor)
      stage_tile(ss, LDS, S, a.lds, 0, l0, a.rank, l_end, RP, kStep);
    else
      stage_tile(ss, LDS, S, a.lds, l0, 0, l_end, a.rank, kStep, RP);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += kTile) {
      typename F::template A<wmma::row_major> fa;
      tile_load(fa, as_ + warp * kTile * LDA + kk, LDA);
#pragma unroll
      for (int jt = 0; jt < RP / kTile; ++jt) {
        if constexpr (kRankMajor) {
          typename F::template B<wmma::col_major> fb;  // psi^T: element (l, j) = ss[j][l]
          tile_load(fb, ss + jt * kTile * LDS + kk, LDS);
          tile_mma(acc[jt], fa, fb);
        } else {
          typename F::template B<wmma::row_major> fb;  // B: element (l, j) = ss[l][j]
          tile_load(fb, ss + kk * LDS + jt * kTile, LDS);
          tile_mma(acc[jt], fa, fb);
        }
      }
    }
    __syncthreads();
  }
  float* out = a.out + (static_cast<int64_t>(blockIdx.y) * a.out_rows + m0 + warp * kTile) * RP;
#pragma unroll
  for (int jt = 0; jt < RP / kTile; ++jt) tile_store(out + jt * kTile, acc[jt], RP);
}

// ---------------------------------------------------------------------------------------------
// Forward epilogue y (+)= t B^T (+ b) (+ add) with t and B in TR, and t in the compute dtype when it is
// held in it (a.t not null). Block (bx, by): rows [64 bx, +64) of y and t, columns slice by of
// y, kFwdCols per step.
// Passes: writes its y tile once (reads it too for rank windows after the first); t is r wide.
// cuBLAS then adds x W^T onto y (beta = 1).
// ---------------------------------------------------------------------------------------------
template <typename T, typename TR, int RP>
__global__ void __launch_bounds__(kThreads) gift_epilogue_kernel(const EpilogueArgs a) {
  using F = Frag<TR>;
  constexpr int P = kPad<TR>;
  constexpr int LDT = RP + P;            // tt [kRows][LDT]     t in TR, the A operand
  constexpr int LDB = RP + P;            // bs [kFwdCols][LDB]  B tile, [n][j]
  constexpr int LDY = kFwdCols + kPadF;  // ys [kRows][LDY]     y tile in float
  constexpr int kOffB = smem_bytes<TR>(kRows * LDT);
  constexpr int kOffY = kOffB + smem_bytes<TR>(kFwdCols * LDB);
  __shared__ __align__(128) unsigned char smem[kOffY + smem_bytes<float>(kRows * LDY)];
  TR* tt = carve<TR>(smem, 0);
  TR* bs = carve<TR>(smem, kOffB);
  float* ys = carve<float>(smem, kOffY);

  const TR* Bm = as<TR>(a.B);
  const T* bias = as<T>(a.bias);
  const T* add = as<T>(a.add);
  T* t = as<T>(a.t);
  T* y = as<T>(a.y);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * a.n_per_split;
  const int64_t n_end = a.N < n_begin + a.n_per_split ? a.N : n_begin + a.n_per_split;

  // t rounded to TR (the epilogue's operand); the first column slice writes it out in T when
  // it is saved in T (a float t is the glue's copy of t32). Read after the first barrier below.
  stage_tile(tt, LDT, a.t32, a.ldt32, m0, 0, a.M, a.rank, kRows, RP);
  if (blockIdx.y == 0 && t != nullptr) {
    for (int i = static_cast<int>(threadIdx.x); i < kRows * RP; i += kThreads) {
      const int r = i / RP, j = i % RP;
      if (j < a.rank && m0 + r < a.M) t[(m0 + r) * a.ldt + j] = from_float<T>(a.t32[(m0 + r) * a.ldt32 + j]);
    }
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kFwdCols) {
    stage_tile(bs, LDB, Bm, a.ldb, n0, 0, n_end, a.rank, kFwdCols, RP);
    __syncthreads();
#pragma unroll
    for (int ct = 0; ct < kFwdCols / kTile; ++ct) {
      typename F::Acc out;
      tile_zero(out);
#pragma unroll
      for (int jt = 0; jt < RP / kTile; ++jt) {
        typename F::template A<wmma::row_major> fa;
        tile_load(fa, tt + warp * kTile * LDT + jt * kTile, LDT);
        typename F::template B<wmma::col_major> fb;  // B^T: element (j, n) = bs[n][j]
        tile_load(fb, bs + ct * kTile * LDB + jt * kTile, LDB);
        tile_mma(out, fa, fb);
      }
      tile_store(ys + warp * kTile * LDY + ct * kTile, out, LDY);
    }
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kRows * kFwdCols; i += kThreads) {
      const int r = i / kFwdCols, c = i % kFwdCols;
      const int64_t m = m0 + r, n = n0 + c;
      if (m < a.M && n < n_end) {
        float v = ys[r * LDY + c];
        if (bias != nullptr) v += to_float(bias[n]);
        if (add != nullptr) v += to_float(add[m * a.ldadd + n]);
        T* dst = y + m * a.ldy + n;
        if (a.accumulate) v += to_float(*dst);
        *dst = from_float<T>(v);
      }
    }
    // The next step's staging writes bs only, which every warp finished reading above; its
    // ys stores come after its own barrier. No barrier needed here.
  }
}

// ---------------------------------------------------------------------------------------------
// dB = g^T t (and db = g^T 1 in column `rank` when colsum), multiplied in TR. Block (bx, by):
// columns [64 bx, +64) of g (rows of dB), rows slice by of g. Also dphi = W^T dB (g = W, t = dB)
// when the rank path is wide.
// Passes: reads its g tile once. Output: float partial out[by] (r wide).
// ---------------------------------------------------------------------------------------------
template <typename T, typename TR, int RP>
__global__ void __launch_bounds__(kThreads) gift_db_kernel(const DbArgs a) {
  using F = Frag<TR>;
  constexpr int P = kPad<TR>;
  constexpr int LDG = kRows + P;  // gs [kStep][LDG]  g tile, [m][n]
  constexpr int LDT = RP + P;     // ts [kStep][LDT]  [t | 1] tile, [m][j]
  __shared__ __align__(128) unsigned char smem[smem_bytes<TR>(kStep * LDG) + smem_bytes<TR>(kStep * LDT)];
  TR* gs = carve<TR>(smem, 0);
  TR* ts = carve<TR>(smem, smem_bytes<TR>(kStep * LDG));

  const T* g = as<T>(a.g);
  const TR* t = as<TR>(a.t);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * a.m_per_split;
  const int64_t m_end = a.M < m_begin + a.m_per_split ? a.M : m_begin + a.m_per_split;

  typename F::Acc acc[RP / kTile];
#pragma unroll
  for (int jt = 0; jt < RP / kTile; ++jt) tile_zero(acc[jt]);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kStep) {
    stage_tile(gs, LDG, g, a.ldg, m0, n0, m_end, a.N, kStep, kRows);
    stage_tile(ts, LDT, t, a.ldt, m0, 0, m_end, a.rank, kStep, RP, a.colsum ? a.rank : -1);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += kTile) {
      typename F::template A<wmma::col_major> fa;  // g^T: element (n, m) = gs[m][n]
      tile_load(fa, gs + kk * LDG + warp * kTile, LDG);
#pragma unroll
      for (int jt = 0; jt < RP / kTile; ++jt) {
        typename F::template B<wmma::row_major> fb;
        tile_load(fb, ts + kk * LDT + jt * kTile, LDT);
        tile_mma(acc[jt], fa, fb);
      }
    }
    __syncthreads();
  }
  float* out = a.out + (static_cast<int64_t>(blockIdx.y) * a.out_rows + n0 + warp * kTile) * RP;
#pragma unroll
  for (int jt = 0; jt < RP / kTile; ++jt) tile_store(out + jt * kTile, acc[jt], RP);
}

// ---------------------------------------------------------------------------------------------
// dx = dt psi (+ add) and dpsi^T = x^T dt, multiplied in TR. Block (bx, by): columns [64 bx, +64) of x
// and dx (rows of dpsi^T), rows slice by.
// Passes: reads its x tile once (if dpsi is wanted), writes its dx tile once (if dx is);
// cuBLAS then adds g W onto dx (beta = 1). Output: float partial out[by] of dpsi^T (r wide).
// ---------------------------------------------------------------------------------------------
template <typename T, typename TR, int RP>
__global__ void __launch_bounds__(kThreads) gift_dx_kernel(const DxArgs a) {
  using F = Frag<TR>;
  constexpr int P = kPad<TR>;
  constexpr int LDPS = kRows + P;  // ps [RP][LDPS]    psi tile, [j][k], staged once
  constexpr int LDD = RP + P;      // ds [kStep][LDD]  dt tile in TR, [m][j]
  constexpr int LDX = kRows + P;   // xs [kStep][LDX]  x tile, [m][k]
  constexpr int LDO = kRows + kPadF;  // os [kStep][LDO] dx tile in float
  constexpr int kOffD = smem_bytes<TR>(RP * LDPS);
  constexpr int kOffX = kOffD + smem_bytes<TR>(kStep * LDD);
  constexpr int kOffO = kOffX + smem_bytes<TR>(kStep * LDX);
  __shared__ __align__(128) unsigned char smem[kOffO + smem_bytes<float>(kStep * LDO)];
  TR* ps = carve<TR>(smem, 0);
  TR* ds = carve<TR>(smem, kOffD);
  TR* xs = carve<TR>(smem, kOffX);
  float* os = carve<float>(smem, kOffO);

  const TR* psi = as<TR>(a.psi);
  const T* x = as<T>(a.x);
  const T* add = as<T>(a.add);
  T* dx = as<T>(a.dx);
  const bool want_dx = dx != nullptr, want_dpsi = a.out != nullptr;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * a.m_per_split;
  const int64_t m_end = a.M < m_begin + a.m_per_split ? a.M : m_begin + a.m_per_split;

  if (want_dx) stage_tile(ps, LDPS, psi, a.ldpsi, 0, k0, a.rank, a.K, RP, kRows);  // read after the first barrier
  typename F::Acc acc[RP / kTile];
#pragma unroll
  for (int jt = 0; jt < RP / kTile; ++jt) tile_zero(acc[jt]);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kStep) {
    stage_tile(ds, LDD, a.dt, a.lddt, m0, 0, m_end, a.rank, kStep, RP);
    if (want_dpsi) stage_tile(xs, LDX, x, a.ldx, m0, k0, m_end, a.K, kStep, kRows);
    __syncthreads();
    if (want_dx) {
      // the kStep x 64 dx tile is 2 x 4 tiles: warp w takes row tile w % 2, column tiles w / 2 and w / 2 + 2
      const int rt = warp % 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int ct = warp / 2 + 2 * half;
        typename F::Acc out;
        tile_zero(out);
#pragma unroll
        for (int jt = 0; jt < RP / kTile; ++jt) {
          typename F::template A<wmma::row_major> fa;
          tile_load(fa, ds + rt * kTile * LDD + jt * kTile, LDD);
          typename F::template B<wmma::row_major> fb;
          tile_load(fb, ps + jt * kTile * LDPS + ct * kTile, LDPS);
          tile_mma(out, fa, fb);
        }
        tile_store(os + rt * kTile * LDO + ct * kTile, out, LDO);
      }
    }
    if (want_dpsi) {
#pragma unroll
      for (int kk = 0; kk < kStep; kk += kTile) {
        typename F::template A<wmma::col_major> fa;  // x^T: element (k, m) = xs[m][k]
        tile_load(fa, xs + kk * LDX + warp * kTile, LDX);
#pragma unroll
        for (int jt = 0; jt < RP / kTile; ++jt) {
          typename F::template B<wmma::row_major> fb;
          tile_load(fb, ds + kk * LDD + jt * kTile, LDD);
          tile_mma(acc[jt], fa, fb);
        }
      }
    }
    __syncthreads();
    if (want_dx) {
      for (int i = static_cast<int>(threadIdx.x); i < kStep * kRows; i += kThreads) {
        const int r = i / kRows, c = i % kRows;
        const int64_t m = m0 + r, k = k0 + c;
        if (m < m_end && k < a.K) {
          float v = os[r * LDO + c];
          if (add != nullptr) v += to_float(add[m * a.ldadd + k]);
          T* dst = dx + m * a.lddx + k;
          if (a.accumulate) v += to_float(*dst);
          *dst = from_float<T>(v);
        }
      }
    }
    // The next step stages ds/xs, read above before the barrier; its os stores follow its own
    // barrier. No barrier needed here.
  }
  if (want_dpsi) {
    float* out = a.out + (static_cast<int64_t>(blockIdx.y) * a.out_rows + k0 + warp * kTile) * RP;
#pragma unroll
    for (int jt = 0; jt < RP / kTile; ++jt) tile_store(out + jt * kTile, acc[jt], RP);
  }
}

// out[i] = sum over the splits of parts[p * n + i]. Reads the r-wide partials once.
__global__ void __launch_bounds__(kThreads)
    gift_sum_partials_kernel(const float* parts, int64_t count, int64_t n, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    float s = 0.0f;
    for (int64_t p = 0; p < count; ++p) s += parts[p * n + i];
    out[i] = s;
  }
}

}  // namespace gift
