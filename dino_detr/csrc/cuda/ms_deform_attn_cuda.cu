// CUDA kernels of multi-scale deformable attention (float32, float16, bfloat16; float64 too).
//
// One group of G lanes (G = a power of two, min(D, 32) rounded up) handles one (n, q, m):
// the lanes stride over the D contiguous channels, every lane computing the same bilinear
// corner weights of each (l, p) sample. Accumulation is in float (double for float64).
//   forward:  each group writes its own output row; no atomics.
//   backward: grad_value by atomics (into a float32 buffer for half types, cast at the end);
//             the location / weight gradients of a sample are reduced across the group by
//             warp shuffles and written by its first lane (one group owns each sample).
// Level shapes and starts are read on the device; a level that would reach outside value
// is skipped, so bad values can never cause an out-of-bounds read.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../ms_deform_attn.h"

namespace dino_detr {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
  int group;  // lanes per (n, q, m)
};

// Bilinear sample of one level in float math; see the CPU kernel for the convention.
template <typename acc_t>
struct Sample {
  acc_t fx, fy, weight[4];
  int64_t offset[4];  // element offsets from the level's start, for one head
  bool valid[4];

  __device__ bool init(acc_t loc_x, acc_t loc_y, int64_t h, int64_t w, int64_t position_stride) {
    const acc_t x = loc_x * static_cast<acc_t>(w) - acc_t(0.5);
    const acc_t y = loc_y * static_cast<acc_t>(h) - acc_t(0.5);
    if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(w) && y < static_cast<acc_t>(h))) return false;
    const acc_t x0f = floor(x), y0f = floor(y);
    const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
    fx = x - x0f;
    fy = y - y0f;
    const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < w, in_y0 = y0 >= 0, in_y1 = y0 + 1 < h;
    valid[0] = in_y0 && in_x0;
    valid[1] = in_y0 && in_x1;
    valid[2] = in_y1 && in_x0;
    valid[3] = in_y1 && in_x1;
    weight[0] = (acc_t(1) - fy) * (acc_t(1) - fx);
    weight[1] = (acc_t(1) - fy) * fx;
    weight[2] = fy * (acc_t(1) - fx);
    weight[3] = fy * fx;
    offset[0] = (y0 * w + x0) * position_stride;
    offset[1] = offset[0] + position_stride;
    offset[2] = offset[0] + w * position_stride;
    offset[3] = offset[2] + position_stride;
    return true;
  }
};

// Level l's shape and start if it lies inside value's S axis, else false.
__device__ inline bool read_level(const int64_t* shapes, const int64_t* starts, int64_t l, int64_t spatial,
                                  int64_t& h, int64_t& w, int64_t& start) {
  h = shapes[2 * l];
  w = shapes[2 * l + 1];
  start = starts[l];
  return h > 0 && w > 0 && start >= 0 && start <= spatial && h * w <= spatial - start;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ out, Dims s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_groups = s.batch * s.queries * s.heads;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / s.group);
  const int lane = threadIdx.x % s.group;
  const int64_t stride = s.heads * s.channels;
  for (int64_t qm = blockIdx.x * (blockDim.x / s.group) + threadIdx.x / s.group; qm < num_groups;
       qm += groups_per_grid) {
    const int64_t n = qm / (s.queries * s.heads), m = qm % s.heads;
    const scalar_t* value_nm = value + n * s.spatial * stride + m * s.channels;
    const scalar_t* loc_qm = locations + qm * s.levels * s.points * 2;
    const scalar_t* attn_qm = weights + qm * s.levels * s.points;
    for (int64_t d0 = 0; d0 < s.channels; d0 += s.group) {
      const int64_t d = d0 + lane;
      const bool active = d < s.channels;
      acc_t acc = 0;
      for (int64_t l = 0; l < s.levels; ++l) {
        int64_t h, w, start;
        if (!read_level(shapes, starts, l, s.spatial, h, w, start)) continue;
        const scalar_t* v = value_nm + start * stride + d;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t lp = l * s.points + p;
          Sample<acc_t> b;
          if (!active || !b.init(static_cast<acc_t>(loc_qm[2 * lp]), static_cast<acc_t>(loc_qm[2 * lp + 1]), h, w,
                                 stride)) {
            continue;
          }
          acc_t sampled = 0;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.valid[c]) sampled += b.weight[c] * static_cast<acc_t>(v[b.offset[c]]);
          }
          acc += static_cast<acc_t>(attn_qm[lp]) * sampled;
        }
      }
      if (active) out[qm * s.channels + d] = static_cast<scalar_t>(acc);
    }
  }
}

// Sum over the group's lanes (all lanes of the group call it together).
template <typename acc_t>
__device__ inline acc_t group_sum(acc_t x, int group, unsigned mask) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset, group);
  return x;
}

template <typename scalar_t, typename grad_value_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                                grad_value_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, Dims s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_groups = s.batch * s.queries * s.heads;
  const int groups_per_block = blockDim.x / s.group;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int lane = threadIdx.x % s.group;
  const unsigned mask =
      s.group == 32 ? 0xffffffffu : (((1u << s.group) - 1u) << ((threadIdx.x % 32) / s.group * s.group));
  const int64_t stride = s.heads * s.channels;
  for (int64_t qm = blockIdx.x * groups_per_block + threadIdx.x / s.group; qm < num_groups; qm += groups_per_grid) {
    const int64_t n = qm / (s.queries * s.heads), m = qm % s.heads;
    const int64_t head_offset = n * s.spatial * stride + m * s.channels;
    const scalar_t* g = grad_out + qm * s.channels;
    const scalar_t* loc_qm = locations + qm * s.levels * s.points * 2;
    const scalar_t* attn_qm = weights + qm * s.levels * s.points;
    for (int64_t l = 0; l < s.levels; ++l) {
      int64_t h, w, start;
      if (!read_level(shapes, starts, l, s.spatial, h, w, start)) continue;
      const int64_t level_offset = head_offset + start * stride;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t lp = l * s.points + p;
        Sample<acc_t> b;
        // The branch is uniform over the group, so the shuffles below see all its lanes.
        if (!b.init(static_cast<acc_t>(loc_qm[2 * lp]), static_cast<acc_t>(loc_qm[2 * lp + 1]), h, w, stride)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn_qm[lp]);
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t d = lane; d < s.channels; d += s.group) {
          const acc_t gd = static_cast<acc_t>(g[d]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            const int64_t index = level_offset + b.offset[c] + d;
            dot[c] += gd * static_cast<acc_t>(value[index]);
            atomicAdd(grad_value + index, static_cast<grad_value_t>(a * b.weight[c] * gd));
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[c] = group_sum(dot[c], s.group, mask);
        if (lane == 0) {
          const int64_t sample = qm * s.levels * s.points + lp;
          grad_attn[sample] = static_cast<scalar_t>(b.weight[0] * dot[0] + b.weight[1] * dot[1] +
                                                    b.weight[2] * dot[2] + b.weight[3] * dot[3]);
          const acc_t dfx = (acc_t(1) - b.fy) * (dot[1] - dot[0]) + b.fy * (dot[3] - dot[2]);
          const acc_t dfy = (acc_t(1) - b.fx) * (dot[2] - dot[0]) + b.fx * (dot[3] - dot[1]);
          grad_loc[2 * sample] = static_cast<scalar_t>(a * static_cast<acc_t>(w) * dfx);
          grad_loc[2 * sample + 1] = static_cast<scalar_t>(a * static_cast<acc_t>(h) * dfy);
        }
      }
    }
  }
}

Dims make_dims(const MSDASizes& s) {
  int group = 1;
  while (group < s.channels && group < 32) group *= 2;
  return {s.batch, s.spatial, s.heads, s.channels, s.queries, s.levels, s.points, group};
}

unsigned grid_size(const Dims& d) {
  const int64_t groups = d.batch * d.queries * d.heads;
  const int64_t blocks = (groups + kThreads / d.group - 1) / (kThreads / d.group);
  return static_cast<unsigned>(std::min<int64_t>(blocks, 65535LL * 32));
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const MSDASizes sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::zeros({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());
  const Dims dims = make_dims(sizes);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    forward_kernel<scalar_t><<<grid_size(dims), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        dims);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const bool half_type = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // Half types accumulate grad_value in float32 (atomics on 16-bit values lose too much).
  at::Tensor grad_value_acc = at::zeros_like(value, half_type ? value.options().dtype(at::kFloat) : value.options());
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  const Dims dims = make_dims(sizes);
  if (grad_attn.numel() > 0 && value.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using grad_value_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, grad_value_t><<<grid_size(dims), kThreads, 0, stream>>>(
          grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(), grad_value_acc.data_ptr<grad_value_t>(),
          grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), dims);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dino_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dino_detr
