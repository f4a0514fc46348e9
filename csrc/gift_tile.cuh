// Warp-level 16x16x16 tile products used by every GIFT kernel, one interface for all dtypes:
//
//   half / bfloat16: tensor cores through WMMA (fp32 accumulators);
//   float:           plain FMAs on CUDA cores (WMMA's tf32 would lose the fp32 precision
//                    the tests hold float32 to).
//
// A kernel only calls tile_zero / tile_load / tile_mma / tile_store on shared-memory tiles,
// so the same kernel source serves the three dtypes. Under GIFT_EMULATION the WMMA calls go to
// csrc/emulation/simt_emulator.h, which runs the kernels on the CPU for the test suite.
//
// Alignment rules the callers keep (WMMA's, checked by the emulator): tile pointers 32-byte
// aligned, leading dimensions a multiple of 16 bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef GIFT_EMULATION
#include "emulation/simt_emulator.h"
#else
#include <mma.h>
#endif

namespace gift {

#ifdef GIFT_EMULATION
namespace wmma = ::gift_emu::wmma;
#else
namespace wmma = ::nvcuda::wmma;
#endif

constexpr int kTile = 16;  // WMMA's m = n = k
constexpr int kWarpSize = 32;

// ---- conversions (explicit: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- float: a 16x16 tile on CUDA cores ----
// Lane l owns row l / 2, columns (l % 2) * 8 .. + 8 of the accumulator tile. Operand
// "fragments" only remember where the shared-memory tile is; tile_mma reads it directly.

struct FmaAcc {
  float v[8];
};

template <typename Layout>
struct FmaOperand {
  const float* p;
  unsigned ldm;
};

__device__ __forceinline__ float fma_elem(const FmaOperand<wmma::row_major>& f, int row, int col) {
  return f.p[row * f.ldm + col];
}
__device__ __forceinline__ float fma_elem(const FmaOperand<wmma::col_major>& f, int row, int col) {
  return f.p[col * f.ldm + row];
}

// ---- the per-dtype fragment types ----

template <typename T>
struct Frag {
  template <typename Layout>
  using A = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, Layout>;
  template <typename Layout>
  using B = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;
};

template <>
struct Frag<float> {
  template <typename Layout>
  using A = FmaOperand<Layout>;
  template <typename Layout>
  using B = FmaOperand<Layout>;
  using Acc = FmaAcc;
};

// ---- tensor-core versions ----

template <typename F>
__device__ __forceinline__ void tile_zero(F& acc) {
  wmma::fill_fragment(acc, 0.0f);
}

template <typename F, typename T>
__device__ __forceinline__ void tile_load(F& frag, const T* p, int ldm) {
  wmma::load_matrix_sync(frag, p, static_cast<unsigned>(ldm));
}

template <typename Acc, typename A, typename B>
__device__ __forceinline__ void tile_mma(Acc& acc, const A& a, const B& b) {
  wmma::mma_sync(acc, a, b, acc);
}

// Row-major store of an accumulator tile (shared or global memory).
template <typename Acc>
__device__ __forceinline__ void tile_store(float* p, const Acc& acc, int ldm) {
  wmma::store_matrix_sync(p, acc, static_cast<unsigned>(ldm), wmma::mem_row_major);
}

// ---- CUDA-core versions (more specialised overloads, chosen for float) ----

__device__ __forceinline__ void tile_zero(FmaAcc& acc) {
#pragma unroll
  for (int c = 0; c < 8; ++c) acc.v[c] = 0.0f;
}

template <typename Layout>
__device__ __forceinline__ void tile_load(FmaOperand<Layout>& frag, const float* p, int ldm) {
  frag.p = p;
  frag.ldm = static_cast<unsigned>(ldm);
}

template <typename LA, typename LB>
__device__ __forceinline__ void tile_mma(FmaAcc& acc, const FmaOperand<LA>& a, const FmaOperand<LB>& b) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int row = lane / 2, col0 = (lane % 2) * 8;
#pragma unroll
  for (int k = 0; k < kTile; ++k) {
    const float av = fma_elem(a, row, k);
#pragma unroll
    for (int c = 0; c < 8; ++c) acc.v[c] = fmaf(av, fma_elem(b, k, col0 + c), acc.v[c]);
  }
}

__device__ __forceinline__ void tile_store(float* p, const FmaAcc& acc, int ldm) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int row = lane / 2, col0 = (lane % 2) * 8;
#pragma unroll
  for (int c = 0; c < 8; ++c) p[row * ldm + col0 + c] = acc.v[c];
}

}  // namespace gift
