// Launchers: pick the kernel instantiation for (dtype, padded rank) and launch it on the
// stream the glue passes (torch's current stream). No torch headers here: the glue
// (gift_ops.cpp) owns everything torch, so nvcc compiles only our code and CUDA's.
// Compiled by nvcc for the extension, or by the host compiler with GIFT_EMULATION defined
// (csrc/emulation/gift_launch_emulated.cpp) for the CPU test build.
#include <type_traits>

#include "gift_kernels.cuh"

#ifdef GIFT_EMULATION
#define GIFT_LAUNCH(kernel, grid, stream, ...)                                                          \
  ((void)(stream), ::gift_emu::launch({(grid).x, (grid).y, 1}, {::gift::kThreads, 1, 1}, [&] { kernel(__VA_ARGS__); }))
#else
#define GIFT_LAUNCH(kernel, grid, stream, ...) \
  kernel<<<dim3((grid).x, (grid).y), ::gift::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

namespace gift {
namespace {

struct Grid {
  unsigned x, y;
};

unsigned blocks_for(int64_t extent) { return static_cast<unsigned>((extent + kBlockRows - 1) / kBlockRows); }

int launch_error() {
#ifdef GIFT_EMULATION
  return 0;  // the emulator throws instead
#else
  return static_cast<int>(cudaGetLastError());
#endif
}

// Call f(T{}, TR{}, std::integral_constant<int, RP>{}) for the runtime dtype, rank-path
// operand type (TR = float when `wide`, which only fp16 sets; else T) and padded rank.
template <typename F>
void dispatch(DType dtype, bool wide, int rp, F&& f) {
  auto by_rank = [&](auto tag, auto rank_tag) {
    if (rp == 16)
      f(tag, rank_tag, std::integral_constant<int, 16>{});
    else if (rp == 32)
      f(tag, rank_tag, std::integral_constant<int, 32>{});
    else
      f(tag, rank_tag, std::integral_constant<int, 64>{});
  };
  switch (dtype) {
    case DType::kFloat32: by_rank(float{}, float{}); break;
    case DType::kFloat16:
      if (wide)
        by_rank(__half{}, float{});
      else
        by_rank(__half{}, __half{});
      break;
    case DType::kBFloat16: by_rank(__nv_bfloat16{}, __nv_bfloat16{}); break;
  }
}

}  // namespace

int launch_skinny(const SkinnyArgs& a, void* stream) {
  const Grid grid{blocks_for(a.rows), static_cast<unsigned>(a.splits)};
  if (grid.x == 0) return 0;
  dispatch(a.dtype, false, padded_rank(a.rank), [&](auto tag, auto, auto rp) {
    using T = decltype(tag);
    constexpr int RP = decltype(rp)::value;
    const auto kernel = a.s_rank_major ? &gift_skinny_kernel<T, RP, true> : &gift_skinny_kernel<T, RP, false>;
    GIFT_LAUNCH(kernel, grid, stream, a);
  });
  return launch_error();
}

int launch_epilogue(const EpilogueArgs& a, void* stream) {
  const Grid grid{blocks_for(a.M), static_cast<unsigned>(a.n_splits)};
  if (grid.x == 0) return 0;
  dispatch(a.dtype, a.wide, padded_rank(a.rank), [&](auto tag, auto rank_tag, auto rp) {
    const auto kernel = &gift_epilogue_kernel<decltype(tag), decltype(rank_tag), decltype(rp)::value>;
    GIFT_LAUNCH(kernel, grid, stream, a);
  });
  return launch_error();
}

int launch_db(const DbArgs& a, void* stream) {
  const Grid grid{blocks_for(a.N), static_cast<unsigned>(a.m_splits)};
  if (grid.x == 0) return 0;
  dispatch(a.dtype, a.wide, padded_rank(a.rank + (a.colsum ? 1 : 0)), [&](auto tag, auto rank_tag, auto rp) {
    const auto kernel = &gift_db_kernel<decltype(tag), decltype(rank_tag), decltype(rp)::value>;
    GIFT_LAUNCH(kernel, grid, stream, a);
  });
  return launch_error();
}

int launch_dx(const DxArgs& a, void* stream) {
  const Grid grid{blocks_for(a.K), static_cast<unsigned>(a.m_splits)};
  if (grid.x == 0) return 0;
  dispatch(a.dtype, a.wide, padded_rank(a.rank), [&](auto tag, auto rank_tag, auto rp) {
    const auto kernel = &gift_dx_kernel<decltype(tag), decltype(rank_tag), decltype(rp)::value>;
    GIFT_LAUNCH(kernel, grid, stream, a);
  });
  return launch_error();
}

int launch_sum_partials(const float* parts, int64_t count, int64_t n, float* out, void* stream) {
  if (n == 0) return 0;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const Grid grid{static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 1};
  GIFT_LAUNCH(gift_sum_partials_kernel, grid, stream, parts, count, n, out);
  return launch_error();
}

}  // namespace gift
