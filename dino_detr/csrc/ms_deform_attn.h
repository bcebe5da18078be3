// Multi-scale deformable attention: shared declarations and input checks.
//
// Shapes (all inputs contiguous, one device):
//   value               (N, S, M, D)        float
//   spatial_shapes      (L, 2)              int64 (H, W) per level
//   level_start_index   (L,)                int64
//   sampling_locations  (N, Lq, M, L, P, 2) float, normalized (x, y); pixel centres at (i + 0.5) / W
//   attention_weights   (N, Lq, M, L, P)    float
// sampling_locations and attention_weights have value's dtype, or float32 when value is float16
// or bfloat16 (sampling in half precision would quantize the locations).
//   output              (N, Lq, M * D)
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#include "ms_deform_attn_sample.h"

namespace dino_detr {

// How Python prints a dtype ("torch.float32"), so that errors read as the Python ones.
inline std::string dtype_name(at::ScalarType type) { return "torch." + std::string(c10::getDtypeNames(type).first); }

// Checks ranks, matching sizes, dtypes, devices and contiguity without reading tensor data; returns
// the sizes. Errors name the tensor and what was expected: ValueError for a shape, device or layout,
// TypeError for a dtype. These are the checks of the native op; dino_detr/layers/ms_deform_attn.py
// repeats them (as _check_metadata) only where no C++ runs: the fake kernel and the reference fallback.
inline MSDASizes check_ms_deform_attn_inputs(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  struct Input {
    const char* name;
    const at::Tensor& tensor;
    int64_t rank;
    const char* layout;
  };
  const Input inputs[] = {{"value", value, 4, "(N, S, M, D)"},
                          {"spatial_shapes", spatial_shapes, 2, "(L, 2)"},
                          {"level_start_index", level_start_index, 1, "(L,)"},
                          {"sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)"},
                          {"attention_weights", attention_weights, 5, "(N, Lq, M, L, P)"}};
  for (const Input& in : inputs) {
    TORCH_CHECK_VALUE(in.tensor.dim() == in.rank, "ms_deform_attn: ", in.name, " must have rank ", in.rank, " ",
                      in.layout, ", got shape ", in.tensor.sizes());
  }
  TORCH_CHECK_VALUE(spatial_shapes.size(1) == 2, "ms_deform_attn: spatial_shapes must be (L, 2) of (H, W), got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must end in 2 normalized (x, y) coordinates, got shape ",
                    sampling_locations.sizes());
  const MSDASizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                    sampling_locations.size(1), spatial_shapes.size(0), sampling_locations.size(4)};
  struct Match {
    const char *what, *name_a;
    int64_t a;
    const char* name_b;
    int64_t b;
  };
  const Match matches[] = {
      {"batch size", "value", s.batch, "sampling_locations", sampling_locations.size(0)},
      {"batch size", "value", s.batch, "attention_weights", attention_weights.size(0)},
      {"head count", "value", s.heads, "sampling_locations", sampling_locations.size(2)},
      {"head count", "value", s.heads, "attention_weights", attention_weights.size(2)},
      {"level count", "spatial_shapes", s.levels, "level_start_index", level_start_index.size(0)},
      {"level count", "spatial_shapes", s.levels, "sampling_locations", sampling_locations.size(3)},
      {"level count", "spatial_shapes", s.levels, "attention_weights", attention_weights.size(3)},
      {"query count", "sampling_locations", s.queries, "attention_weights", attention_weights.size(1)},
      {"point count", "sampling_locations", s.points, "attention_weights", attention_weights.size(4)}};
  for (const Match& m : matches) {
    TORCH_CHECK_VALUE(m.a == m.b, "ms_deform_attn: ", m.what, " mismatch: ", m.name_a, " has ", m.a, ", ", m.name_b,
                      " has ", m.b);
  }
  for (const Input& in : inputs) {
    TORCH_CHECK_VALUE(in.tensor.device() == value.device(),
                      "ms_deform_attn: all inputs must be on one device; value is on ", value.device(), ", ", in.name,
                      " is on ", in.tensor.device());
  }
  for (const Input* in : {&inputs[0], &inputs[3], &inputs[4]}) {
    const at::ScalarType type = in->tensor.scalar_type();
    TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
                     "ms_deform_attn: ", in->name, " must be a floating-point tensor, got ", dtype_name(type));
  }
  const bool half_value = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  for (const Input* in : {&inputs[3], &inputs[4]}) {
    const at::ScalarType type = in->tensor.scalar_type();
    TORCH_CHECK_TYPE(type == value.scalar_type() || (half_value && type == at::kFloat),
                     "ms_deform_attn: mixed float dtypes: value is ", dtype_name(value.scalar_type()), ", ", in->name,
                     " is ", dtype_name(type),
                     "; use value's dtype (or float32 locations and weights with a float16/bfloat16 value)");
  }
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == attention_weights.scalar_type(),
                   "ms_deform_attn: mixed float dtypes: sampling_locations is ",
                   dtype_name(sampling_locations.scalar_type()), ", attention_weights is ",
                   dtype_name(attention_weights.scalar_type()), "; use one dtype for both");
  for (const Input* in : {&inputs[1], &inputs[2]}) {
    TORCH_CHECK_TYPE(in->tensor.scalar_type() == at::kLong, "ms_deform_attn: ", in->name, " must be int64, got ",
                     dtype_name(in->tensor.scalar_type()));
  }
  for (const Input& in : inputs) {
    TORCH_CHECK_VALUE(in.tensor.is_contiguous(), "ms_deform_attn: ", in.name, " must be contiguous, got strides ",
                      in.tensor.strides(), " for shape ", in.tensor.sizes());
  }
  return s;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const MSDASizes& s) {
  const std::vector<int64_t> sizes{s.batch, s.queries, s.heads * s.channels};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(sizes), "ms_deform_attn_backward: grad_output must be ",
                    at::IntArrayRef(sizes), ", got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output is ",
                   dtype_name(grad_output.scalar_type()), ", value is ", dtype_name(value.scalar_type()));
  TORCH_CHECK_VALUE(grad_output.device() == value.device() && grad_output.is_contiguous(),
                    "ms_deform_attn_backward: grad_output must be contiguous and on value's device (", value.device(),
                    "), got ", grad_output.device(), " with strides ", grad_output.strides());
}

}  // namespace dino_detr
