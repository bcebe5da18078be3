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

#include "ms_deform_attn_sample.h"

namespace dino_detr {

// Checks ranks, matching sizes, dtypes, devices and contiguity; returns the sizes.
inline MSDASizes check_ms_deform_attn_inputs(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be (L,), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  const MSDASizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                    sampling_locations.size(1), spatial_shapes.size(0), sampling_locations.size(4)};
  TORCH_CHECK(level_start_index.size(0) == s.levels, "ms_deform_attn: level count mismatch");
  const std::vector<int64_t> loc_sizes{s.batch, s.queries, s.heads, s.levels, s.points, 2};
  const std::vector<int64_t> attn_sizes{s.batch, s.queries, s.heads, s.levels, s.points};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(loc_sizes),
              "ms_deform_attn: sampling_locations must be ", at::IntArrayRef(loc_sizes), ", got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(attn_sizes),
              "ms_deform_attn: attention_weights must be ", at::IntArrayRef(attn_sizes), ", got ",
              attention_weights.sizes());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be floating point");
  const bool half_value = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  const at::ScalarType loc_type = sampling_locations.scalar_type();
  TORCH_CHECK(attention_weights.scalar_type() == loc_type &&
                  (loc_type == value.scalar_type() || (half_value && loc_type == at::kFloat)),
              "ms_deform_attn: sampling_locations and attention_weights must have value's dtype (or float32 "
              "with a float16/bfloat16 value), got value ", value.scalar_type(), ", sampling_locations ", loc_type,
              ", attention_weights ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on ", value.device());
  }
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous");
  }
  return s;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const MSDASizes& s) {
  const std::vector<int64_t> sizes{s.batch, s.queries, s.heads * s.channels};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(sizes), "ms_deform_attn_backward: grad_output must be ",
              at::IntArrayRef(sizes), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device() &&
                  grad_output.is_contiguous(),
              "ms_deform_attn_backward: grad_output must be contiguous, on value's device and of its dtype");
}

}  // namespace dino_detr
