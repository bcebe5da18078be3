// CUDA operators of multi-scale deformable attention: ATen glue around the kernels and launch
// code of ms_deform_attn_kernels.cuh (shared with the host emulation in tests/cuda_emulation/).
//
// Inputs are checked on the host (shapes, dtypes, devices) without reading device memory; the
// level layout lives on the device and is checked there by the kernels (a device-side assertion,
// as for an out-of-range index in PyTorch's own kernels), so a call never synchronizes.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <type_traits>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

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
    msda::launch_forward(backend, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
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
  const CudaBackend backend{c10::cuda::getCurrentCUDAStream()};
  dispatch_types(value, sampling_locations, [&](auto scalar, auto loc) {
    using scalar_t = decltype(scalar);
    using loc_t = decltype(loc);
    msda::launch_backward(backend, grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                          spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                          sampling_locations.data_ptr<loc_t>(), attention_weights.data_ptr<loc_t>(),
                          grad_value_acc.data_ptr<msda::grad_value_acc_t<scalar_t>>(), grad_loc.data_ptr<loc_t>(),
                          grad_attn.data_ptr<loc_t>(), sizes);
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dino_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dino_detr
