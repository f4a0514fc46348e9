// The CUDA backend of GIFT as torch.library ops in the gift_kernels namespace: the epilogue
// form (two ops) and the input-side form (two ops, below gift_bwd):
//
//   cuda_gift_input_fwd(Tensor x, Tensor phi, Tensor psi) -> (Tensor u, Tensor t)
//   cuda_gift_input_bwd(Tensor grad_u, Tensor x, Tensor t, Tensor phi, Tensor psi, bool[] needs)
//       -> (dx, dphi, dpsi)
//
//   cuda_gift_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor phi, Tensor psi)
//       -> (Tensor y, Tensor t, Tensor B)
//   cuda_gift_linear_bwd(Tensor grad_y, Tensor x, Tensor t, Tensor B, Tensor weight,
//       Tensor phi, Tensor psi, bool[] needs) -> (dx, dweight, dbias, dphi, dpsi)
//
// with the schemas of gift_kernels::gift_linear_fwd / gift_linear_bwd (gift_kernels/ops/schema.py),
// which pick this backend at run time and call these ops. An unneeded gradient comes back as
// an empty (0-element) tensor, as there. Fake (meta) implementations and autograd are
// registered from Python (gift_kernels/ops/cuda/ops.py).
//
// Work per call, with the passes over M x d activations each step makes:
//   forward   B = W phi (cuBLAS, weights only; gift_skinny_kernel when B is held in float32, see
//             below); gift_skinny_kernel: t = x psi^T (reads x once);
//             gift_epilogue_kernel: y = t B^T + b (writes y once); cuBLAS y += x W^T (beta = 1:
//             reads y once more).
//   backward  gift_skinny_kernel: dt = g B (reads g); gift_db_kernel: dB = g^T t and db (reads g);
//             gift_dx_kernel: dx = dt psi, dpsi = dt^T x (writes dx, reads x); cuBLAS
//             dx += g W (beta = 1: reads dx once more); dphi = W^T dB, dW = g^T x + dB phi^T
//             (cuBLAS, only for what is needed).
// Ranks above 64 run in windows of 64, each window one more pass of each kernel.
//
// Rank-path dtype (gift_kernels/ops/dtypes.py rank_dtype): t and B are held, and received by
// backward, in float32 for 16-bit x with a float32 (or wider) Theta, else in x's dtype; dt and dB
// are float32 always (the kernels' partial sums). With fp16 x and a float32 rank path ("wide")
// the kernels multiply t, dt and dB in float (FMA path) and dphi = W^T dB runs in gift_db_kernel,
// so that a t = x psi^T beyond fp16's range cannot overflow where the merged layer would not;
// bf16 has float32's range and keeps its tensor cores (operands rounded to bf16).
//
// Built with GIFT_EMULATION (the CPU test build) the same glue registers these ops for CPU
// tensors in the gift_kernels_emulated namespace, with the kernels run by the SIMT emulator.
#include <Python.h>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "gift_launch.h"

#ifdef GIFT_EMULATION
#include <cstdlib>
#define GIFT_NS gift_kernels_emulated
#define GIFT_KEY CPU
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#define GIFT_NS gift_kernels
#define GIFT_KEY CUDA
#endif

namespace gift {
namespace {

using at::Tensor;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

constexpr const char* kFwd = "gift_kernels::cuda_gift_linear_fwd";
constexpr const char* kBwd = "gift_kernels::cuda_gift_linear_bwd";
constexpr const char* kInputFwd = "gift_kernels::cuda_gift_input_fwd";
constexpr const char* kInputBwd = "gift_kernels::cuda_gift_input_bwd";

// ---- messages in the words of gift_kernels/ops/checks.py ----

std::string shape(const Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got dtype ", dtype_name(t.scalar_type()), " (shape ",
                   shape(t), ")");
}

void check_same_device(const char* op, const std::vector<std::pair<const char*, const Tensor*>>& tensors) {
  const Tensor& x = *tensors.front().second;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device().str(), " (shape ", shape(*t),
                      ") but ", tensors.front().first, " is on ", x.device().str(), " (shape ", shape(x),
                      "); all tensors must be on one device");
  }
#ifndef GIFT_EMULATION
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": ", tensors.front().first, " is on ", x.device().str(), " (shape ", shape(x),
                    "); the CUDA extension runs only on CUDA tensors");
#endif
}

// The dtype t and B are held in: float32 for 16-bit x with a float32 (or wider) Theta, else x's
// dtype (the rule of gift_kernels/ops/dtypes.py rank_dtype, which the op schema's fake follows).
at::ScalarType rank_dtype(at::ScalarType x, at::ScalarType theta) {
  const bool narrow = x == at::kHalf || x == at::kBFloat16;
  return narrow && c10::elementSize(theta) >= 4 ? at::kFloat : x;
}

// x/W's dtype is the compute dtype; the kernels exist for three.
DType compute_dtype(const char* op, const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": x dtype ", dtype_name(x.scalar_type()), " (shape ", shape(x),
                       ") is not supported by the CUDA extension; use float32, float16 or bfloat16");
  }
  return DType::kFloat32;  // unreachable
}

// The same cases, in the same order, as check_gift_args(..., x_2d=True).
void check_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi,
                    const Tensor& psi) {
  const char* op = kFwd;
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  check_float(op, "phi", phi);
  check_float(op, "psi", psi);
  if (bias) check_float(op, "bias", *bias);

  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, d_in), got shape ", shape(x));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (d_out, d_in), got shape ", shape(weight));
  const int64_t d_out = weight.size(0), d_in = weight.size(1);
  TORCH_CHECK_VALUE(x.size(1) == d_in, op, ": x's last dimension (", x.size(1), ") must equal weight's d_in (", d_in,
                    "); x has shape ", shape(x), ", weight has shape ", shape(weight));
  TORCH_CHECK_VALUE(phi.dim() == 2, op, ": phi must be 2-D (d_in, r), got shape ", shape(phi));
  TORCH_CHECK_VALUE(psi.dim() == 2, op, ": psi must be 2-D (r, d_in), got shape ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(0) == d_in, op, ": phi must have shape (d_in, r) with d_in = ", d_in, " from weight ",
                    shape(weight), ", got phi ", shape(phi));
  TORCH_CHECK_VALUE(psi.size(1) == d_in, op, ": psi must have shape (r, d_in) with d_in = ", d_in, " from weight ",
                    shape(weight), ", got psi ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(1) == psi.size(0), op, ": phi's rank (", phi.size(1), ") and psi's rank (", psi.size(0),
                    ") differ: phi ", shape(phi), ", psi ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(1) >= 1, op, ": rank r must be >= 1, got phi ", shape(phi), " and psi ", shape(psi));
  if (bias)
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d_out, op, ": bias must have shape (", d_out,
                      ",) to match weight ", shape(weight), ", got bias ", shape(*bias));

  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", dtype_name(x.scalar_type()),
                   " differs from weight dtype ", dtype_name(weight.scalar_type()), " (x ", shape(x), ", weight ",
                   shape(weight), "); cast one of them or use torch.autocast");
  if (bias)
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ",
                     dtype_name(bias->scalar_type()), " differs from weight dtype ", dtype_name(weight.scalar_type()),
                     " (bias ", shape(*bias), ", weight ", shape(weight), ")");
  TORCH_CHECK_TYPE(phi.scalar_type() == psi.scalar_type(), op, ": phi dtype ", dtype_name(phi.scalar_type()),
                   " differs from psi dtype ", dtype_name(psi.scalar_type()), "; keep Theta in one dtype (phi ",
                   shape(phi), ", psi ", shape(psi), ")");

  std::vector<std::pair<const char*, const Tensor*>> all = {{"x", &x}, {"weight", &weight}, {"phi", &phi}, {"psi", &psi}};
  if (bias) all.emplace_back("bias", &*bias);
  check_same_device(op, all);
  compute_dtype(op, x);
}

// Backward receives what forward saved; a direct caller gets the same clear errors.
void check_bwd_args(const Tensor& grad_y, const Tensor& x, const Tensor& t, const Tensor& B, const Tensor& weight,
                    const Tensor& phi, const Tensor& psi, const c10::List<bool>& needs) {
  const char* op = kBwd;
  TORCH_CHECK_VALUE(needs.size() == 5, op, ": needs must have 5 flags for (x, weight, bias, phi, psi), got ",
                    needs.size());
  const std::vector<std::pair<const char*, const Tensor*>> all = {
      {"x", &x}, {"grad_y", &grad_y}, {"t", &t}, {"B", &B}, {"weight", &weight}, {"phi", &phi}, {"psi", &psi}};
  for (const auto& [name, tensor] : all) {
    check_float(op, name, *tensor);
    TORCH_CHECK_VALUE(tensor->dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape(*tensor));
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = phi.size(1);
  auto expect = [&](const char* name, const Tensor& tensor, int64_t rows, int64_t cols, const char* dims) {
    TORCH_CHECK_VALUE(tensor.size(0) == rows && tensor.size(1) == cols, op, ": ", name, " must have shape ", dims,
                      " = (", rows, ", ", cols, ") from x ", shape(x), ", weight ", shape(weight), " and phi ",
                      shape(phi), ", got ", name, " ", shape(tensor));
  };
  expect("weight", weight, N, K, "(d_out, d_in)");
  expect("phi", phi, K, r, "(d_in, r)");
  expect("psi", psi, r, K, "(r, d_in)");
  expect("grad_y", grad_y, M, N, "(M, d_out)");
  expect("t", t, M, r, "(M, r)");
  expect("B", B, N, r, "(d_out, r)");
  TORCH_CHECK_VALUE(r >= 1, op, ": rank r must be >= 1, got phi ", shape(phi), " and psi ", shape(psi));
  TORCH_CHECK_TYPE(phi.scalar_type() == psi.scalar_type(), op, ": phi dtype ", dtype_name(phi.scalar_type()),
                   " differs from psi dtype ", dtype_name(psi.scalar_type()), "; keep Theta in one dtype (phi ",
                   shape(phi), ", psi ", shape(psi), ")");
  const at::ScalarType rd = rank_dtype(x.scalar_type(), phi.scalar_type());
  for (const auto& [name, tensor] : all) {
    if (tensor == &phi || tensor == &psi) continue;
    if (tensor == &t || tensor == &B) {
      TORCH_CHECK_TYPE(tensor->scalar_type() == rd, op, ": ", name, " dtype ", dtype_name(tensor->scalar_type()),
                       " differs from the rank-path dtype ", dtype_name(rd), " of x dtype ",
                       dtype_name(x.scalar_type()), " with Theta dtype ", dtype_name(phi.scalar_type()), " (", name,
                       " ", shape(*tensor), ", x ", shape(x), "); pass the t and B the forward returned");
    } else {
      TORCH_CHECK_TYPE(tensor->scalar_type() == x.scalar_type(), op, ": ", name, " dtype ",
                       dtype_name(tensor->scalar_type()), " differs from x dtype ", dtype_name(x.scalar_type()), " (",
                       name, " ", shape(*tensor), ", x ", shape(x), ")");
    }
  }
  check_same_device(op, all);
  compute_dtype(op, x);
}

// Theta against d_in, in the words of checks.py _check_theta.
void check_theta(const char* op, int64_t d_in, const Tensor& phi, const Tensor& psi, const std::string& against) {
  TORCH_CHECK_VALUE(phi.dim() == 2, op, ": phi must be 2-D (d_in, r), got shape ", shape(phi));
  TORCH_CHECK_VALUE(psi.dim() == 2, op, ": psi must be 2-D (r, d_in), got shape ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(0) == d_in, op, ": phi must have shape (d_in, r) with d_in = ", d_in, " from ", against,
                    ", got phi ", shape(phi));
  TORCH_CHECK_VALUE(psi.size(1) == d_in, op, ": psi must have shape (r, d_in) with d_in = ", d_in, " from ", against,
                    ", got psi ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(1) == psi.size(0), op, ": phi's rank (", phi.size(1), ") and psi's rank (", psi.size(0),
                    ") differ: phi ", shape(phi), ", psi ", shape(psi));
  TORCH_CHECK_VALUE(phi.size(1) >= 1, op, ": rank r must be >= 1, got phi ", shape(phi), " and psi ", shape(psi));
  TORCH_CHECK_TYPE(phi.scalar_type() == psi.scalar_type(), op, ": phi dtype ", dtype_name(phi.scalar_type()),
                   " differs from psi dtype ", dtype_name(psi.scalar_type()), "; keep Theta in one dtype (phi ",
                   shape(phi), ", psi ", shape(psi), ")");
}

// The same cases, in the same order, as check_input_args(..., x_2d=True).
void check_input_fwd_args(const Tensor& x, const Tensor& phi, const Tensor& psi) {
  const char* op = kInputFwd;
  check_float(op, "x", x);
  check_float(op, "phi", phi);
  check_float(op, "psi", psi);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, d_in), got shape ", shape(x));
  check_theta(op, x.size(1), phi, psi, "x " + shape(x));
  check_same_device(op, {{"x", &x}, {"phi", &phi}, {"psi", &psi}});
  compute_dtype(op, x);
}

// Backward receives what forward saved (du from the base layer's backward, x, t); a direct
// caller gets the same clear errors.
void check_input_bwd_args(const Tensor& grad_u, const Tensor& x, const Tensor& t, const Tensor& phi,
                          const Tensor& psi, const c10::List<bool>& needs) {
  const char* op = kInputBwd;
  TORCH_CHECK_VALUE(needs.size() == 3, op, ": needs must have 3 flags for (x, phi, psi), got ", needs.size());
  const std::vector<std::pair<const char*, const Tensor*>> all = {
      {"x", &x}, {"grad_u", &grad_u}, {"t", &t}, {"phi", &phi}, {"psi", &psi}};
  for (const auto& [name, tensor] : all) {
    check_float(op, name, *tensor);
    TORCH_CHECK_VALUE(tensor->dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape(*tensor));
  }
  check_theta(op, x.size(1), phi, psi, "x " + shape(x));
  const int64_t M = x.size(0), K = x.size(1), r = phi.size(1);
  TORCH_CHECK_VALUE(grad_u.size(0) == M && grad_u.size(1) == K, op, ": grad_u must have the shape of x ", shape(x),
                    ", got grad_u ", shape(grad_u));
  TORCH_CHECK_VALUE(t.size(0) == M && t.size(1) == r, op, ": t must have shape (M, r) = (", M, ", ", r, ") from x ",
                    shape(x), " and phi ", shape(phi), ", got t ", shape(t));
  const at::ScalarType rd = rank_dtype(x.scalar_type(), phi.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == rd, op, ": t dtype ", dtype_name(t.scalar_type()),
                   " differs from the rank-path dtype ", dtype_name(rd), " of x dtype ", dtype_name(x.scalar_type()),
                   " with Theta dtype ", dtype_name(phi.scalar_type()), " (t ", shape(t), ", x ", shape(x),
                   "); pass the t the forward returned");
  TORCH_CHECK_TYPE(grad_u.scalar_type() == x.scalar_type(), op, ": grad_u dtype ", dtype_name(grad_u.scalar_type()),
                   " differs from x dtype ", dtype_name(x.scalar_type()), " (grad_u ", shape(grad_u), ", x ", shape(x),
                   ")");
  check_same_device(op, all);
  compute_dtype(op, x);
}

// ---- launching ----

#ifdef GIFT_EMULATION
void* stream() { return nullptr; }
void check(int) {}  // the emulator throws on its own
// small, so that the test shapes exercise the split paths; the tests override it
int target_blocks() {
  const char* env = std::getenv("GIFT_EMULATION_TARGET_BLOCKS");
  return env != nullptr ? std::atoi(env) : 4;
}
#else
void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
void check(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }
// About as many blocks as fit on the device at once (4 per SM for these kernels), so that
// enough loads are in flight to stream at memory bandwidth.
int target_blocks() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return 4 * sms;
}
#endif

// ---- splits: aim for target_blocks() blocks; see gift_kernels.cuh ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t per;  // extent of one slice, a multiple of kStep
  int count;
};

// Slice `extent` into the fewest slices that give `blocks` x slices >= target blocks.
Split split(int64_t extent, int64_t blocks, int64_t target) {
  const int64_t steps = std::max<int64_t>(1, ceil_div(extent, kStep));
  const int64_t want = std::clamp<int64_t>(ceil_div(target, std::max<int64_t>(blocks, 1)), 1, steps);
  const int64_t per = ceil_div(steps, want) * kStep;
  return {per, static_cast<int>(std::max<int64_t>(1, ceil_div(extent, per)))};
}

// Sum `count` partials of shape (rows, cols) into one float (rows, cols) tensor.
Tensor reduce_partials(const Tensor& parts, int count) {
  if (count == 1) return parts.select(0, 0);
  Tensor out = at::empty({parts.size(1), parts.size(2)}, parts.options());
  check(launch_sum_partials(parts.data_ptr<float>(), count, out.numel(), out.data_ptr<float>(), stream()));
  return out;
}

int64_t padded_rows(int64_t n) { return ceil_div(n, kBlockRows) * kBlockRows; }

// out (n x r, float), rank window by window: launch(r0, rank, parts) writes one window's split
// partials into parts (splits x padded_rows(n) x padded_rank(rank)), summed here.
template <typename Launch>
Tensor windowed_float(int64_t n, int64_t r, int splits, const at::TensorOptions& f32, Launch&& launch) {
  Tensor out = at::empty({n, r}, f32);
  for (int64_t r0 = 0; r0 < r; r0 += kMaxRank) {
    const int rank = static_cast<int>(std::min<int64_t>(kMaxRank, r - r0));
    const Tensor parts = at::empty({splits, padded_rows(n), padded_rank(rank)}, f32);
    launch(r0, rank, parts);
    out.narrow(1, r0, rank).copy_(reduce_partials(parts, splits).narrow(0, 0, n).narrow(1, 0, rank));
  }
  return out;
}

// out (rows x r, float) = a s by gift_skinny_kernel (float accumulation): a (rows x len) and
// s (len x r) contiguous in the compute dtype. B = W phi held in float32.
Tensor skinny_float(DType dtype, const Tensor& a, const Tensor& s, int target) {
  const int64_t rows = a.size(0), len = a.size(1), r = s.size(1);
  const Split ls = split(len, ceil_div(rows, kBlockRows), target);
  return windowed_float(rows, r, ls.count, a.options().dtype(at::kFloat), [&](int64_t r0, int rank, const Tensor& parts) {
    SkinnyArgs sa;
    sa.dtype = dtype, sa.rows = rows, sa.len = len, sa.rank = rank;
    sa.a = a.data_ptr(), sa.lda = len;
    sa.s = s.narrow(1, r0, rank).data_ptr(), sa.lds = r, sa.s_rank_major = false;
    sa.out = parts.data_ptr<float>(), sa.out_rows = padded_rows(rows);
    sa.per_split = ls.per, sa.splits = ls.count;
    check(launch_skinny(sa, stream()));
  });
}

// out (cols x r, float) = a^T s by gift_db_kernel multiplying in float: a (rows x cols) contiguous
// in the compute dtype, s (rows x r) contiguous float. dphi = W^T dB on the wide rank path.
Tensor transposed_float(DType dtype, const Tensor& a, const Tensor& s, int target) {
  const int64_t rows = a.size(0), cols = a.size(1), r = s.size(1);
  const Split ms = split(rows, ceil_div(cols, kBlockRows), target);
  return windowed_float(cols, r, ms.count, a.options().dtype(at::kFloat), [&](int64_t r0, int rank, const Tensor& parts) {
    DbArgs ba;
    ba.dtype = dtype, ba.wide = true, ba.M = rows, ba.N = cols, ba.rank = rank, ba.colsum = false;
    ba.g = a.data_ptr(), ba.ldg = cols;
    ba.t = s.narrow(1, r0, rank).data_ptr(), ba.ldt = r;
    ba.out = parts.data_ptr<float>(), ba.out_rows = padded_rows(cols);
    ba.m_per_split = ms.per, ba.m_splits = ms.count;
    check(launch_db(ba, stream()));
  });
}

// ---- one rank window (at most kMaxRank columns) of each kernel: what the ops share ----

// t = x psi^T (s: psi's rows, rank-major) or dt = g B / du phi (s: len x r) for one window,
// its split partials summed: padded_rows(a.size(0)) x padded_rank(rank), float.
Tensor skinny_window(DType dtype, const Tensor& a, const void* s, int64_t lds, bool rank_major, int rank,
                     const Split& sp) {
  const int64_t rows = a.size(0), len = a.size(1);
  const Tensor parts = at::empty({sp.count, padded_rows(rows), padded_rank(rank)}, a.options().dtype(at::kFloat));
  SkinnyArgs ta;
  ta.dtype = dtype, ta.rows = rows, ta.len = len, ta.rank = rank;
  ta.a = a.data_ptr(), ta.lda = len;
  ta.s = s, ta.lds = lds, ta.s_rank_major = rank_major;
  ta.out = parts.data_ptr<float>(), ta.out_rows = padded_rows(rows);
  ta.per_split = sp.per, ta.splits = sp.count;
  check(launch_skinny(ta, stream()));
  return reduce_partials(parts, sp.count);
}

// y (+)= t32 B^T (+ bias) (+ add) for one window (y M x N contiguous, B's window N x rank with
// row stride ldb); t_out (M x rank, row stride ldt): t written in the compute dtype, or null.
void epilogue_window(DType dtype, bool wide, const Tensor& t32, int rank, const void* B, int64_t ldb,
                     const void* bias, const void* add, void* t_out, int64_t ldt, Tensor& y, bool accumulate,
                     const Split& ns) {
  EpilogueArgs ea;
  ea.dtype = dtype, ea.wide = wide, ea.M = y.size(0), ea.N = y.size(1), ea.rank = rank;
  ea.t32 = t32.data_ptr<float>(), ea.ldt32 = t32.size(1);
  ea.B = B, ea.ldb = ldb, ea.bias = bias;
  ea.add = add, ea.ldadd = y.size(1);
  ea.t = t_out, ea.ldt = ldt;
  ea.y = y.data_ptr(), ea.ldy = y.size(1), ea.accumulate = accumulate;
  ea.n_per_split = ns.per, ea.n_splits = ns.count;
  check(launch_epilogue(ea, stream()));
}

// dx (+)= dt psi (+ add) (dx M x K contiguous, or null) and, when want_dpsi, the window's
// dpsi^T = x^T dt with its split partials summed (padded_rows(K) x padded_rank(rank), float).
Tensor dx_window(DType dtype, bool wide, const Tensor& dt, int rank, const void* psi, const Tensor& x, void* dx,
                 const void* add, bool accumulate, bool want_dpsi, const Split& ms) {
  const int64_t M = x.size(0), K = x.size(1);
  const Tensor parts =
      want_dpsi ? at::empty({ms.count, padded_rows(K), dt.size(1)}, x.options().dtype(at::kFloat)) : Tensor();
  DxArgs xa;
  xa.dtype = dtype, xa.wide = wide, xa.M = M, xa.K = K, xa.rank = rank;
  xa.dt = dt.data_ptr<float>(), xa.lddt = dt.size(1);
  xa.psi = psi, xa.ldpsi = K;
  xa.x = x.data_ptr(), xa.ldx = K;
  xa.add = add, xa.ldadd = K;
  xa.dx = dx, xa.lddx = K, xa.accumulate = accumulate;
  xa.out = want_dpsi ? parts.data_ptr<float>() : nullptr, xa.out_rows = padded_rows(K);
  xa.m_per_split = ms.per, xa.m_splits = ms.count;
  check(launch_dx(xa, stream()));
  return want_dpsi ? reduce_partials(parts, ms.count) : Tensor();
}

// g^T [t | 1] for one window (g M x N contiguous; t's window M x rank, row stride ldt, in the
// rank operand dtype), its split partials summed: padded_rows(N) x padded_rank(rank + colsum).
Tensor db_window(DType dtype, bool wide, const Tensor& g, const void* t, int64_t ldt, int rank, bool colsum,
                 const Split& ms) {
  const int64_t M = g.size(0), N = g.size(1);
  const int rp = padded_rank(rank + (colsum ? 1 : 0));
  const Tensor parts = at::empty({ms.count, padded_rows(N), rp}, g.options().dtype(at::kFloat));
  DbArgs ba;
  ba.dtype = dtype, ba.wide = wide, ba.M = M, ba.N = N, ba.rank = rank, ba.colsum = colsum;
  ba.g = g.data_ptr(), ba.ldg = N;
  ba.t = t, ba.ldt = ldt;
  ba.out = parts.data_ptr<float>(), ba.out_rows = padded_rows(N);
  ba.m_per_split = ms.per, ba.m_splits = ms.count;
  check(launch_db(ba, stream()));
  return reduce_partials(parts, ms.count);
}

// ---- the ops ----

std::tuple<Tensor, Tensor, Tensor> gift_fwd(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& phi, const Tensor& psi) {
  check_fwd_args(x_in, weight, bias, phi, psi);
#ifndef GIFT_EMULATION
  const c10::cuda::CUDAGuard guard(x_in.device());
#endif
  const DType dtype = compute_dtype(kFwd, x_in);
  const auto cd = x_in.scalar_type();
  const auto rd = rank_dtype(cd, phi.scalar_type());
  const bool wide = cd == at::kHalf && rd == at::kFloat;
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), r = phi.size(1);
  const int target = target_blocks();
  const Tensor x = x_in.contiguous();
  const Tensor psi_c = psi.to(cd).contiguous();
  const Tensor phi_c = phi.to(cd).contiguous();
  // N x r, weights only: in x's dtype by cuBLAS, or accumulated and held in float32
  const Tensor B = rd == cd ? at::mm(weight, phi_c) : skinny_float(dtype, weight.contiguous(), phi_c, target);
  const Tensor B_op = B.to(wide ? at::kFloat : cd);  // the epilogue's operand (B itself unless bf16 + float32 Theta)
  const Tensor b = bias ? bias->contiguous() : Tensor();
  Tensor y = at::empty({M, N}, x.options());
  Tensor t = at::empty({M, r}, x.options().dtype(rd));
  if (M > 0) {
    const Split ks = split(K, ceil_div(M, kBlockRows), target);
    const Split ns = split(N, ceil_div(M, kBlockRows), target);
    for (int64_t r0 = 0; r0 < r; r0 += kMaxRank) {
      const int rank = static_cast<int>(std::min<int64_t>(kMaxRank, r - r0));
      // t = x psi^T, then y (+)= t B^T (+ b)
      const Tensor t32 = skinny_window(dtype, x, psi_c.narrow(0, r0, rank).data_ptr(), K, true, rank, ks);
      epilogue_window(dtype, wide, t32, rank, B_op.narrow(1, r0, rank).data_ptr(), r,
                      r0 == 0 && b.defined() ? b.data_ptr() : nullptr, nullptr,
                      rd == cd ? t.narrow(1, r0, rank).data_ptr() : nullptr, r, y, r0 > 0, ns);
      if (rd != cd) t.narrow(1, r0, rank).copy_(t32.narrow(0, 0, M).narrow(1, 0, rank));  // t held in float32
    }
  }
  y.addmm_(x, weight.t());  // cuBLAS, beta = 1 onto t B^T + b
  return {y, t, B};
}

Grads gift_bwd(const Tensor& grad_y, const Tensor& x_in, const Tensor& t_in, const Tensor& B_in, const Tensor& weight,
               const Tensor& phi, const Tensor& psi, const c10::List<bool>& needs) {
  check_bwd_args(grad_y, x_in, t_in, B_in, weight, phi, psi, needs);
#ifndef GIFT_EMULATION
  const c10::cuda::CUDAGuard guard(x_in.device());
#endif
  const bool need_x = needs.get(0), need_w = needs.get(1), need_b = needs.get(2), need_phi = needs.get(3),
             need_psi = needs.get(4);
  const DType dtype = compute_dtype(kBwd, x_in);
  const auto cd = x_in.scalar_type();
  const bool wide = cd == at::kHalf && rank_dtype(cd, phi.scalar_type()) == at::kFloat;
  const auto rank_op = wide ? at::kFloat : cd;  // the dtype the kernels multiply t, dt and dB in
  const auto f32 = x_in.options().dtype(at::kFloat);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight.size(0), r = phi.size(1);
  const int target = target_blocks();
  const Tensor g = grad_y.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor t = t_in.to(rank_op).contiguous();  // gift_db_kernel's operand
  const Tensor B = B_in.to(cd).contiguous();  // dt = g B in the skinny kernel (accumulated in float)
  const Tensor psi_c = psi.to(rank_op).contiguous();
  const bool need_dt = need_x || need_psi, need_dB = need_phi || need_w;

  Tensor dx = need_x ? at::empty({M, K}, x.options()) : Tensor();
  Tensor dpsi = need_psi ? at::empty({r, K}, f32) : Tensor();
  Tensor dB = need_dB ? at::empty({N, r}, f32) : Tensor();
  Tensor db;
  const Split dt_split = split(N, ceil_div(M, kBlockRows), target);
  const Split db_split = split(M, ceil_div(N, kBlockRows), target);
  const Split dx_split = split(M, ceil_div(K, kBlockRows), target);

  for (int64_t r0 = 0; r0 < r; r0 += kMaxRank) {
    const int rank = static_cast<int>(std::min<int64_t>(kMaxRank, r - r0));
    // db rides as a column of ones next to t when the last window has room for it
    const bool colsum = need_b && r0 + rank == r && rank < kMaxRank;
    if (need_dt) {
      // dt = g B, then dx (+)= dt psi and dpsi^T = x^T dt
      const Tensor dt = skinny_window(dtype, g, B.narrow(1, r0, rank).data_ptr(), r, false, rank, dt_split);
      const Tensor dpsi_t = dx_window(dtype, wide, dt, rank, psi_c.narrow(0, r0, rank).data_ptr(), x,
                                      need_x ? dx.data_ptr() : nullptr, nullptr, r0 > 0, need_psi, dx_split);
      if (need_psi) dpsi.narrow(0, r0, rank).copy_(dpsi_t.narrow(0, 0, K).narrow(1, 0, rank).t());
    }
    if (need_dB || colsum) {  // dB = g^T t, db = g^T 1
      const Tensor sums = db_window(dtype, wide, g, t.narrow(1, r0, rank).data_ptr(), r, rank, colsum, db_split)
                              .narrow(0, 0, N);
      if (need_dB) dB.narrow(1, r0, rank).copy_(sums.narrow(1, 0, rank));
      if (colsum) db = at::empty({N}, x.options()).copy_(sums.select(1, rank));  // a fresh tensor, not a view
    }
  }

  Tensor dw, dphi;
  if (need_x) dx.addmm_(g, weight);  // cuBLAS, beta = 1 onto dt psi
  if (need_b && !db.defined()) db = g.sum(0);  // rank a multiple of 64: no spare column, one more pass
  if (need_dB && wide) {  // dB (float) may exceed fp16's range: W^T dB and dB phi^T in float
    if (need_phi) dphi = transposed_float(dtype, weight.contiguous(), dB, target).to(phi.scalar_type());
    if (need_w) {
      dw = at::mm(g.t(), x);
      dw.add_(at::mm(dB, phi.to(at::kFloat).t()));  // float N x K, rounded once into dw
    }
  } else if (need_dB) {
    const Tensor dB_c = dB.to(cd);
    if (need_phi) dphi = at::mm(weight.t(), dB_c).to(phi.scalar_type());
    if (need_w) {
      dw = at::mm(dB_c, phi.to(cd).t());
      dw.addmm_(g.t(), x);
    }
  }
  if (need_psi) dpsi = dpsi.to(psi.scalar_type());

  auto empty_unless = [&](bool need, Tensor grad, at::ScalarType st) {
    return need ? grad : at::empty({0}, x.options().dtype(st));
  };
  return {empty_unless(need_x, dx, cd), empty_unless(need_w, dw, cd), empty_unless(need_b, db, cd),
          empty_unless(need_phi, dphi, phi.scalar_type()), empty_unless(need_psi, dpsi, psi.scalar_type())};
}

// ---- the input-side form: u = x + (x psi^T) phi^T, the base layer runs on u ----
//
// forward   gift_skinny_kernel: t = x psi^T (reads x); gift_epilogue_kernel with B = phi and
//           add = x: u = x + t phi^T (reads x, writes u). Three passes over M x d_in.
// backward  gift_skinny_kernel: dt = du phi (reads du); gift_dx_kernel with add = du:
//           dx = du + dt psi and the dpsi^T partials (reads du and x, writes dx);
//           gift_db_kernel: the dphi = du^T t partials (reads du). Five passes, every
//           reduction over M into per-split float partials summed by gift_sum_partials_kernel
//           (no atomics: the same bits on every run).

std::tuple<Tensor, Tensor> gift_input_fwd(const Tensor& x_in, const Tensor& phi, const Tensor& psi) {
  check_input_fwd_args(x_in, phi, psi);
#ifndef GIFT_EMULATION
  const c10::cuda::CUDAGuard guard(x_in.device());
#endif
  const DType dtype = compute_dtype(kInputFwd, x_in);
  const auto cd = x_in.scalar_type();
  const auto rd = rank_dtype(cd, phi.scalar_type());
  const bool wide = cd == at::kHalf && rd == at::kFloat;
  const int64_t M = x_in.size(0), K = x_in.size(1), r = phi.size(1);
  Tensor u = at::empty({M, K}, x_in.options());
  Tensor t = at::empty({M, r}, x_in.options().dtype(rd));
  if (M == 0 || K == 0) {  // nothing to launch: u = x (no elements when K = 0), t = x psi^T = 0
    u.copy_(x_in);
    t.zero_();
    return {u, t};
  }
  const int target = target_blocks();
  const Tensor x = x_in.contiguous();
  const Tensor psi_c = psi.to(cd).contiguous();
  const Tensor phi_op = phi.to(wide ? at::kFloat : cd).contiguous();  // the epilogue's B operand
  const Split ks = split(K, ceil_div(M, kBlockRows), target);
  const Split ns = split(K, ceil_div(M, kBlockRows), target);
  for (int64_t r0 = 0; r0 < r; r0 += kMaxRank) {
    const int rank = static_cast<int>(std::min<int64_t>(kMaxRank, r - r0));
    // t = x psi^T, then u = x + t phi^T (later rank windows: u += t phi^T)
    const Tensor t32 = skinny_window(dtype, x, psi_c.narrow(0, r0, rank).data_ptr(), K, true, rank, ks);
    epilogue_window(dtype, wide, t32, rank, phi_op.narrow(1, r0, rank).data_ptr(), r, nullptr,
                    r0 == 0 ? x.data_ptr() : nullptr, rd == cd ? t.narrow(1, r0, rank).data_ptr() : nullptr, r, u,
                    r0 > 0, ns);
    if (rd != cd) t.narrow(1, r0, rank).copy_(t32.narrow(0, 0, M).narrow(1, 0, rank));  // t held in float32
  }
  return {u, t};
}

std::tuple<Tensor, Tensor, Tensor> gift_input_bwd(const Tensor& grad_u, const Tensor& x_in, const Tensor& t_in,
                                                  const Tensor& phi, const Tensor& psi, const c10::List<bool>& needs) {
  check_input_bwd_args(grad_u, x_in, t_in, phi, psi, needs);
#ifndef GIFT_EMULATION
  const c10::cuda::CUDAGuard guard(x_in.device());
#endif
  const bool need_x = needs.get(0), need_phi = needs.get(1), need_psi = needs.get(2);
  const DType dtype = compute_dtype(kInputBwd, x_in);
  const auto cd = x_in.scalar_type();
  const bool wide = cd == at::kHalf && rank_dtype(cd, phi.scalar_type()) == at::kFloat;
  const auto rank_op = wide ? at::kFloat : cd;  // the dtype the kernels multiply t and dt in
  const auto f32 = x_in.options().dtype(at::kFloat);
  const int64_t M = x_in.size(0), K = x_in.size(1), r = phi.size(1);
  auto empty_unless = [&](bool need, const Tensor& grad, at::ScalarType st) {
    return need ? grad : at::empty({0}, x_in.options().dtype(st));
  };
  if (M == 0 || K == 0) {  // nothing to launch: every gradient is zero
    return {empty_unless(need_x, at::zeros_like(x_in), cd), empty_unless(need_phi, at::zeros_like(phi), phi.scalar_type()),
            empty_unless(need_psi, at::zeros_like(psi), psi.scalar_type())};
  }
  const int target = target_blocks();
  const Tensor du = grad_u.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor t = t_in.to(rank_op).contiguous();  // gift_db_kernel's operand
  const Tensor phi_c = phi.to(cd).contiguous();  // dt = du phi in the skinny kernel (accumulated in float)
  const Tensor psi_c = psi.to(rank_op).contiguous();
  Tensor dx = need_x ? at::empty({M, K}, x.options()) : Tensor();
  Tensor dphi = need_phi ? at::empty({K, r}, f32) : Tensor();
  Tensor dpsi = need_psi ? at::empty({r, K}, f32) : Tensor();
  const Split dt_split = split(K, ceil_div(M, kBlockRows), target);
  const Split m_split = split(M, ceil_div(K, kBlockRows), target);
  for (int64_t r0 = 0; r0 < r; r0 += kMaxRank) {
    const int rank = static_cast<int>(std::min<int64_t>(kMaxRank, r - r0));
    if (need_x || need_psi) {
      // dt = du phi, then dx = du + dt psi (later windows: dx += dt psi) and dpsi^T = x^T dt
      const Tensor dt = skinny_window(dtype, du, phi_c.narrow(1, r0, rank).data_ptr(), r, false, rank, dt_split);
      const Tensor dpsi_t = dx_window(dtype, wide, dt, rank, psi_c.narrow(0, r0, rank).data_ptr(), x,
                                      need_x ? dx.data_ptr() : nullptr, need_x && r0 == 0 ? du.data_ptr() : nullptr,
                                      r0 > 0, need_psi, m_split);
      if (need_psi) dpsi.narrow(0, r0, rank).copy_(dpsi_t.narrow(0, 0, K).narrow(1, 0, rank).t());
    }
    if (need_phi) {  // dphi = du^T t
      const Tensor sums = db_window(dtype, wide, du, t.narrow(1, r0, rank).data_ptr(), r, rank, false, m_split);
      dphi.narrow(1, r0, rank).copy_(sums.narrow(0, 0, K).narrow(1, 0, rank));
    }
  }
  return {empty_unless(need_x, dx, cd), empty_unless(need_phi, need_phi ? dphi.to(phi.scalar_type()) : dphi, phi.scalar_type()),
          empty_unless(need_psi, need_psi ? dpsi.to(psi.scalar_type()) : dpsi, psi.scalar_type())};
}

#ifndef GIFT_EMULATION
// CPU tensors reach these instead of the dispatcher's generic "could not run" error.
[[noreturn]] void cpu_error(const char* op, const Tensor& first, const char* name) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": ", name, " is a CPU tensor (shape ", shape(first),
                              "); the CUDA extension runs only on CUDA tensors. Use the torch backend for CPU "
                              "tensors (gift_kernels.backend(\"torch\"), or GIFT_KERNELS_BACKEND=torch).");
}

std::tuple<Tensor, Tensor, Tensor> gift_fwd_cpu(const Tensor& x, const Tensor&, const std::optional<Tensor>&,
                                                const Tensor&, const Tensor&) {
  cpu_error(kFwd, x, "x");
}

Grads gift_bwd_cpu(const Tensor& grad_y, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                   const Tensor&, const c10::List<bool>&) {
  cpu_error(kBwd, grad_y, "grad_y");
}

std::tuple<Tensor, Tensor> gift_input_fwd_cpu(const Tensor& x, const Tensor&, const Tensor&) {
  cpu_error(kInputFwd, x, "x");
}

std::tuple<Tensor, Tensor, Tensor> gift_input_bwd_cpu(const Tensor& grad_u, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const c10::List<bool>&) {
  cpu_error(kInputBwd, grad_u, "grad_u");
}
#endif

}  // namespace
}  // namespace gift

TORCH_LIBRARY_FRAGMENT(GIFT_NS, m) {
  m.def("cuda_gift_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor phi, Tensor psi) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_gift_linear_bwd(Tensor grad_y, Tensor x, Tensor t, Tensor B, Tensor weight, Tensor phi, Tensor psi, "
      "bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_gift_input_fwd(Tensor x, Tensor phi, Tensor psi) -> (Tensor, Tensor)");
  m.def(
      "cuda_gift_input_bwd(Tensor grad_u, Tensor x, Tensor t, Tensor phi, Tensor psi, bool[] needs) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(GIFT_NS, GIFT_KEY, m) {
  m.impl("cuda_gift_linear_fwd", &gift::gift_fwd);
  m.impl("cuda_gift_linear_bwd", &gift::gift_bwd);
  m.impl("cuda_gift_input_fwd", &gift::gift_input_fwd);
  m.impl("cuda_gift_input_bwd", &gift::gift_input_bwd);
}

#ifndef GIFT_EMULATION
TORCH_LIBRARY_IMPL(GIFT_NS, CPU, m) {
  m.impl("cuda_gift_linear_fwd", &gift::gift_fwd_cpu);
  m.impl("cuda_gift_linear_bwd", &gift::gift_bwd_cpu);
  m.impl("cuda_gift_input_fwd", &gift::gift_input_fwd_cpu);
  m.impl("cuda_gift_input_bwd", &gift::gift_input_bwd_cpu);
}
#endif

// A Python module object, so that `import gift_kernels._C` works; the ops register above when
// the library loads.
#define GIFT_STR2(x) #x
#define GIFT_STR(x) GIFT_STR2(x)
#define GIFT_CAT2(a, b) a##b
#define GIFT_CAT(a, b) GIFT_CAT2(a, b)
extern "C" PyMODINIT_FUNC GIFT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, GIFT_STR(TORCH_EXTENSION_NAME),
                               "GIFT CUDA kernels (ops register in torch.ops.gift_kernels)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
