// CUDA operators of multi-scale deformable attention: ATen glue around the kernels and launch
// code of ms_deform_attn_launch.cuh (shared with the host emulation in tests/cuda_emulation/).
//
// Kernel variants: the process-wide choice of each stage (forward, backward) is set by
// `ms_deform_attn_use_kernel(stage, name)` (dino_detr/layers/ms_deform_attn_kernels.py times the
// candidates and sets the fastest before each call); under torch.use_deterministic_algorithms(True)
// the backward always runs the deterministic variant.
//
// Inputs are checked on the host (shapes, dtypes, devices) without reading device memory; the
// level layout lives on the device and is checked there by the kernels (a device-side assertion,
// as for an out-of-range index in PyTorch's own kernels), so a call never synchronizes.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_launch.cuh"

namespace dino_detr {
namespace {

// Launches on the current stream.
struct CudaBackend {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned blocks, unsigned threads, Args... args) const {
    kernel<<<blocks, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::atomic<int> forward_kernel{0}, backward_kernel{0};  // indices into kForward/BackwardKernelNames

// The kernel names of a stage, in the order of msda::ForwardKernel / BackwardKernel.
std::vector<std::string> ms_deform_attn_kernel_names(const std::string& stage) {
  TORCH_CHECK_VALUE(stage == "forward" || stage == "backward",
                    "ms_deform_attn: the stage must be 'forward' or 'backward', got '", stage, "'");
  if (stage == "forward") return {std::begin(msda::kForwardKernelNames), std::end(msda::kForwardKernelNames)};
  return {std::begin(msda::kBackwardKernelNames), std::end(msda::kBackwardKernelNames)};
}

// Sets the stage's kernel by name; returns the previous one.
std::string ms_deform_attn_use_kernel(const std::string& stage, const std::string& name) {
  const std::vector<std::string> names = ms_deform_attn_kernel_names(stage);
  const auto it = std::find(names.begin(), names.end(), name);
  TORCH_CHECK_VALUE(it != names.end(), "ms_deform_attn: no ", stage, " kernel '", name, "'; the ", stage,
                    " kernels are ", c10::Join(", ", names));
  std::atomic<int>& choice = stage == "forward" ? forward_kernel : backward_kernel;
  return names[choice.exchange(static_cast<int>(it - names.begin()))];
}

// Calls fn(scalar_t{}, loc_t{}) with loc_t = scalar_t, or float for a half-precision scalar_t
// with float32 locations.
template <typename scalar_t, typename Fn>
void with_loc_type(at::ScalarType loc_type, const Fn& fn) {
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, scalar_t>) {
    fn(scalar_t{}, scalar_t{});
  } else if (loc_type == at::kFloat) {
    fn(scalar_t{}, float{});
  } else {
    fn(scalar_t{}, scalar_t{});
  }
}

template <typename Fn>
void dispatch_types(const at::Tensor& value, const at::Tensor& sampling_locations, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda",
                                  [&] { with_loc_type<scalar_t>(sampling_locations.scalar_type(), fn); });
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const MSDASizes sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());
  const CudaBackend backend{c10::cuda::getCurrentCUDAStream()};
  dispatch_types(value, sampling_locations, [&](auto scalar, auto loc) {
    using scalar_t = decltype(scalar);
    using loc_t = decltype(loc);
    msda::launch_forward(backend, static_cast<msda::ForwardKernel>(forward_kernel.load()),
                         value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                         level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<loc_t>(),
                         attention_weights.data_ptr<loc_t>(), out.data_ptr<scalar_t>(), sizes);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MSDASizes sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_grad_output(grad_output, value, sizes);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_value_acc = at::zeros_like(value, value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto kernel = deterministic ? msda::BackwardKernel::deterministic
                                    : static_cast<msda::BackwardKernel>(backward_kernel.load());
  at::Tensor fixed, bounds;
  msda::DeterministicWorkspace workspace;
  if (kernel == msda::BackwardKernel::deterministic && grad_output.numel() > 0 && attention_weights.numel() > 0) {
    // FixedPointSink's workspace: int64 sums (value's size) and the bounds of its scale.
    fixed = at::zeros(value.sizes(), value.options().dtype(at::kLong));
    const auto max_finite_abs = [](const at::Tensor& t) {
      return at::nan_to_num(t, 0, 0, 0).abs().amax().to(at::kDouble);
    };
    bounds = at::stack({max_finite_abs(grad_output), max_finite_abs(attention_weights)});
    workspace = {reinterpret_cast<unsigned long long*>(fixed.data_ptr<int64_t>()), bounds.data_ptr<double>()};
  }
  const CudaBackend backend{c10::cuda::getCurrentCUDAStream()};
  dispatch_types(value, sampling_locations, [&](auto scalar, auto loc) {
    using scalar_t = decltype(scalar);
    using loc_t = decltype(loc);
    msda::launch_backward(backend, kernel, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                          spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                          sampling_locations.data_ptr<loc_t>(), attention_weights.data_ptr<loc_t>(),
                          grad_value_acc.data_ptr<msda::grad_value_acc_t<scalar_t>>(), grad_loc.data_ptr<loc_t>(),
                          grad_attn.data_ptr<loc_t>(), sizes, workspace);
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dino_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

TORCH_LIBRARY_FRAGMENT(dino_detr, m) {
  m.def("ms_deform_attn_kernel_names(str stage) -> str[]", &ms_deform_attn_kernel_names);
  m.def("ms_deform_attn_use_kernel(str stage, str name) -> str", &ms_deform_attn_use_kernel);
}

}  // namespace dino_detr
