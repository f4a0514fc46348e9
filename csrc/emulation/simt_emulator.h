// A small SIMT emulator that runs the csrc/ kernels on the CPU, for the test suite only.
//
// Why: CI has no GPU, and the CUDA build alone proves the kernels compile, not that they are
// right. Compiled by the host compiler with GIFT_EMULATION defined, the unchanged kernel source
// runs here against the float64 reference (tests/ops/test_cuda_kernels_emulated.py).
//
// How: blocks run one after another; each CUDA thread of a block is a coroutine (ucontext)
// that runs until it reaches __syncthreads() or returns. A block finishes when every thread
// has returned; a barrier reached by some threads while others returned is reported as an
// error (a divergent __syncthreads, which hangs or corrupts a real GPU). Threads run in index
// order, or in reverse order with GIFT_EMULATION_REVERSE=1: a missing barrier between a
// shared-memory write and another thread's read gives different results in the two orders.
//
// WMMA is emulated at the level of its API: every lane holds the whole 16x16 tile, so
// load/mma/store need no cross-lane exchange. Alignment and leading-dimension rules of the
// real API are checked and violations raised as errors.
//
// Not emulated (the kernels do not use them): warp shuffles, atomics, dynamic shared memory.
#pragma once

#include <ucontext.h>

#include <type_traits>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// CUDA keywords for the host compiler. __shared__ becomes `static`: one instance per kernel
// instantiation, shared by the threads of the (single) running block.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace gift_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class ThreadState { kReady, kAtBarrier, kDone };

struct EmuThread {
  ucontext_t ctx;
  std::vector<char> stack;
  Dim3 idx;
  ThreadState state = ThreadState::kReady;
};

struct Runtime {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  ucontext_t scheduler;
  EmuThread* running = nullptr;
  std::function<void()> body;
  std::string error;
  std::vector<EmuThread> threads;
};

inline Runtime& runtime() {
  static Runtime rt;
  return rt;
}

inline void syncthreads() {
  Runtime& rt = runtime();
  rt.running->state = ThreadState::kAtBarrier;
  swapcontext(&rt.running->ctx, &rt.scheduler);
}

inline void thread_entry() {
  Runtime& rt = runtime();
  try {
    rt.body();
  } catch (const std::exception& e) {
    rt.error = e.what();
  }
  rt.running->state = ThreadState::kDone;  // uc_link returns to the scheduler
}

inline void fail(const std::string& what) { throw std::runtime_error("gift emulator: " + what); }

// Run `body` (a kernel call) on a grid of blocks of `block` threads.
inline void launch(Dim3 grid, Dim3 block, std::function<void()> body) {
  constexpr size_t kStack = 256 * 1024;
  Runtime& rt = runtime();
  const size_t n = size_t(block.x) * block.y * block.z;
  if (n == 0 || n > 1024) fail("block of " + std::to_string(n) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("invalid grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z));
  const char* rev = std::getenv("GIFT_EMULATION_REVERSE");
  const bool reverse = rev != nullptr && std::string(rev) == "1";
  rt.threads.resize(n);
  rt.body = std::move(body);
  rt.error.clear();
  rt.block_dim = block;
  rt.grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        rt.block_idx = {bx, by, bz};
        for (size_t i = 0; i < n; ++i) {
          EmuThread& t = rt.threads[i];
          t.stack.resize(kStack);
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack.data();
          t.ctx.uc_stack.ss_size = kStack;
          t.ctx.uc_link = &rt.scheduler;
          makecontext(&t.ctx, thread_entry, 0);
          t.idx = {unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / (size_t(block.x) * block.y))};
          t.state = ThreadState::kReady;
        }
        for (;;) {
          for (size_t j = 0; j < n; ++j) {
            EmuThread& t = rt.threads[reverse ? n - 1 - j : j];
            if (t.state == ThreadState::kDone) continue;
            t.state = ThreadState::kReady;
            rt.running = &t;
            rt.thread_idx = t.idx;
            swapcontext(&rt.scheduler, &t.ctx);
            if (!rt.error.empty()) fail(rt.error);
          }
          size_t done = 0;
          for (const EmuThread& t : rt.threads) done += t.state == ThreadState::kDone;
          if (done == n) break;
          if (done != 0) fail("__syncthreads() reached by " + std::to_string(n - done) + " of " + std::to_string(n) + " threads");
        }
      }
  rt.running = nullptr;
}

// ---- WMMA, emulated at the API level ----
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the 16x16x16 shape is emulated");
  float x[16 * 16];  // element (i, j) at x[i * 16 + j], whatever the memory layout
};

template <typename T>
inline void check_tile(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) fail(std::string(what) + ": ldm " + std::to_string(ldm) + " not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_tile(p, ldm, "load_matrix_sync");
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = as_float(row ? p[i * ldm + j] : p[j * ldm + i]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_tile(p, ldm, "store_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
}

}  // namespace wmma
}  // namespace gift_emu

#define threadIdx (::gift_emu::runtime().thread_idx)
#define blockIdx (::gift_emu::runtime().block_idx)
#define blockDim (::gift_emu::runtime().block_dim)
#define gridDim (::gift_emu::runtime().grid_dim)
#define __syncthreads() ::gift_emu::syncthreads()
