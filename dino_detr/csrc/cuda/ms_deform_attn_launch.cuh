// Launch code of the MSDA CUDA kernels (ms_deform_attn_kernels.cuh: baseline,
// ms_deform_attn_vec_kernels.cuh: vectorized and deterministic), for two execution backends: the
// CUDA runtime (ms_deform_attn_cuda.cu) and the host emulation (tests/cuda_emulation/). A Backend
// has `launch(kernel, blocks, threads_per_block, args...)`.
//
// Kernel variants, by name (dino_detr/layers/ms_deform_attn_kernels.py picks one by timing them):
//   forward:  baseline, vectorized
//   backward: baseline, vectorized, deterministic (bitwise identical run to run; the one used
//             under torch.use_deterministic_algorithms(True))
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ms_deform_attn_kernels.cuh"
#include "ms_deform_attn_vec_kernels.cuh"

namespace dino_detr {
namespace msda {

enum class ForwardKernel { baseline, vectorized };
enum class BackwardKernel { baseline, vectorized, deterministic };

constexpr const char* kForwardKernelNames[] = {"baseline", "vectorized"};
constexpr const char* kBackwardKernelNames[] = {"baseline", "vectorized", "deterministic"};

// Lanes per (n, q, m) for `per_lane` channels per lane: ceil(D / per_lane) rounded up to a power of two, <= 32.
inline Dims make_dims(const MSDASizes& s, int per_lane = 1) {
  const int64_t lanes = (s.channels + per_lane - 1) / per_lane;
  int group = 1;
  while (group < lanes && group < 32) group *= 2;
  return {s.batch, s.spatial, s.heads, s.channels, s.queries, s.levels, s.points, group};
}

// Blocks for one group per (n, q, m), capped (the kernels loop over the rest).
inline unsigned grid_size(const Dims& d) {
  const int64_t groups = d.batch * d.queries * d.heads;
  const int64_t groups_per_block = kThreads / d.group;
  return static_cast<unsigned>(std::min<int64_t>((groups + groups_per_block - 1) / groups_per_block, kMaxBlocks));
}

// Whether the vectorized kernels may move V = 16 / sizeof(scalar_t) channels with one access:
// D a multiple of V and every buffer 16-byte aligned (then so is every V-channel slice of a row).
template <typename scalar_t>
bool vector_io_allowed(const MSDASizes& s, std::initializer_list<const void*> buffers) {
  if (s.channels % kVecWidth<scalar_t> != 0) return false;
  return std::all_of(buffers.begin(), buffers.end(),
                     [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; });
}

// grad_value accumulates in float32 for the half types (16-bit atomics lose too much).
template <typename scalar_t>
using grad_value_acc_t = at::opmath_type<scalar_t>;

// out: (N, Lq, M * D), written in full.
template <typename scalar_t, typename loc_t, typename Backend>
void launch_forward(const Backend& backend, ForwardKernel kernel, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const loc_t* locations, const loc_t* weights, scalar_t* out,
                    const MSDASizes& sizes) {
  if (sizes.batch * sizes.queries * sizes.heads * sizes.channels == 0) return;
  if (kernel == ForwardKernel::vectorized) {
    const Dims dims = make_dims(sizes, kVecWidth<scalar_t>);
    backend.launch(forward_vec_kernel<scalar_t, loc_t>, grid_size(dims), kThreads, value, shapes, starts, locations,
                   weights, out, dims, vector_io_allowed<scalar_t>(sizes, {value, out}));
    return;
  }
  const Dims dims = make_dims(sizes);
  backend.launch(forward_kernel<scalar_t, loc_t>, grid_size(dims), kThreads, value, shapes, starts, locations,
                 weights, out, dims);
}

// Scratch of the deterministic backward: `fixed`, value's element count of zeros, and `bounds`,
// {max |grad_output|, max |attention_weights|} (FixedPointSink), both on the device.
struct DeterministicWorkspace {
  unsigned long long* fixed = nullptr;
  const double* bounds = nullptr;
};

// grad_value, grad_loc, grad_attn: zero-filled on entry (atomics add to the first; a sample that
// touches no pixel leaves the other two at 0).
template <typename scalar_t, typename loc_t, typename Backend>
void launch_backward(const Backend& backend, BackwardKernel kernel, const scalar_t* grad_out, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const loc_t* locations, const loc_t* weights,
                     grad_value_acc_t<scalar_t>* grad_value, loc_t* grad_loc, loc_t* grad_attn,
                     const MSDASizes& sizes, const DeterministicWorkspace& workspace = {}) {
  using acc_t = grad_value_acc_t<scalar_t>;
  if (sizes.batch * sizes.queries * sizes.heads * sizes.levels * sizes.points == 0 || sizes.channels == 0) return;
  if (kernel == BackwardKernel::baseline) {
    const Dims dims = make_dims(sizes);
    backend.launch(backward_kernel<scalar_t, loc_t, acc_t>, grid_size(dims), kThreads, grad_out, value, shapes,
                   starts, locations, weights, grad_value, grad_loc, grad_attn, dims);
    return;
  }
  const Dims dims = make_dims(sizes, kVecWidth<scalar_t>);
  const bool vector_io = vector_io_allowed<scalar_t>(sizes, {grad_out, value, grad_value});
  if (kernel == BackwardKernel::vectorized) {
    backend.launch(backward_vec_kernel<scalar_t, loc_t, AtomicSink<acc_t>>, grid_size(dims), kThreads, grad_out,
                   value, shapes, starts, locations, weights, AtomicSink<acc_t>{grad_value}, grad_loc, grad_attn,
                   dims, vector_io);
    return;
  }
  if (workspace.fixed == nullptr || workspace.bounds == nullptr) {
    throw std::invalid_argument("ms_deform_attn: the deterministic backward needs its workspace");
  }
  backend.launch(backward_vec_kernel<scalar_t, loc_t, FixedPointSink<acc_t>>, grid_size(dims), kThreads, grad_out,
                 value, shapes, starts, locations, weights,
                 FixedPointSink<acc_t>{workspace.fixed, grad_value, workspace.bounds}, grad_loc, grad_attn, dims,
                 vector_io);
  const int64_t numel = sizes.batch * sizes.spatial * sizes.heads * sizes.channels;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks));
  backend.launch(fixed_point_finish_kernel<acc_t>, blocks, kThreads, workspace.fixed, grad_value, numel,
                 workspace.bounds, sizes.queries * sizes.points);
}

}  // namespace msda
}  // namespace dino_detr
