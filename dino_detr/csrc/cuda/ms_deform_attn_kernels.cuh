// The baseline CUDA kernels of multi-scale deformable attention (the design of the original
// Deformable-DETR kernel, kept as the reference point of every variant) and the pieces the variants
// share (Dims, level reading, group sums). Launch code: ms_deform_attn_launch.cuh, written once for
// two execution backends: the CUDA runtime (ms_deform_attn_cuda.cu) and the host emulation of
// tests/cuda_emulation/, which compiles these very files for the CPU so that CI runs them without a GPU.
//
// value is scalar_t (float32, float64, float16, bfloat16); sampling locations and attention
// weights are loc_t: scalar_t, or float32 with a half-precision value. Math is in
// at::opmath_type<scalar_t> (float for the half types).
//
// One group of G lanes (G = a power of two, min(D, 32) rounded up) handles one (n, q, m): the
// lanes stride over the D contiguous channels, every lane computing the same bilinear corners
// of each (l, p) sample (ms_deform_attn_sample.h).
//   forward:  each group writes every channel of its output row (the output is not zero-filled).
//   backward: grad_value by atomics (into a float32 buffer for the half types); the location and
//             weight gradients of a sample are reduced across the group by warp shuffles and
//             written by its first lane (one group owns each sample).
// The level layout is read on the device and checked as the CPU kernel checks it (levels tile S
// in order, sizes without int64 overflow); a bad layout is a device-side assertion, never an
// out-of-bounds read.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../ms_deform_attn_sample.h"

#ifndef MSDA_KERNEL_ASSERT
#define MSDA_KERNEL_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#endif

namespace dino_detr {
namespace msda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 32;  // grid-stride loops cover the rest

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
  int group;  // lanes per (n, q, m)
};

// Level l's shape and start; asserts that it is the next tile of S (next_start: where the
// previous level ended; advanced past this level).
__device__ inline void read_level(const int64_t* shapes, const int64_t* starts, int64_t l, int64_t spatial,
                                  int64_t& next_start, int64_t& h, int64_t& w, int64_t& start) {
  h = shapes[2 * l];
  w = shapes[2 * l + 1];
  start = starts[l];
  MSDA_KERNEL_ASSERT(level_fits(h, w, start, next_start, spatial),
                     "ms_deform_attn: spatial_shapes / level_start_index do not tile value's S axis");
  next_start = start + h * w;
}

__device__ inline void check_levels_cover(int64_t next_start, int64_t spatial) {
  MSDA_KERNEL_ASSERT(next_start == spatial, "ms_deform_attn: spatial_shapes do not sum to value's S");
}

template <typename scalar_t, typename loc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const loc_t* __restrict__ locations,
                               const loc_t* __restrict__ weights, scalar_t* __restrict__ out, Dims s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int groups_per_block = blockDim.x / s.group;
  const int64_t num_groups = s.batch * s.queries * s.heads;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int lane = threadIdx.x % s.group;
  const int64_t stride = s.heads * s.channels;
  for (int64_t qm = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / s.group; qm < num_groups;
       qm += groups_per_grid) {
    const int64_t n = qm / (s.queries * s.heads), m = qm % s.heads;
    const scalar_t* value_nm = value + n * s.spatial * stride + m * s.channels;
    const loc_t* loc_qm = locations + qm * s.levels * s.points * 2;
    const loc_t* attn_qm = weights + qm * s.levels * s.points;
    for (int64_t d = lane; d < s.channels; d += s.group) {
      acc_t acc = 0;
      int64_t next_start = 0;
      for (int64_t l = 0; l < s.levels; ++l) {
        int64_t h, w, start;
        read_level(shapes, starts, l, s.spatial, next_start, h, w, start);
        const scalar_t* v = value_nm + start * stride + d;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t lp = l * s.points + p;
          Bilinear<acc_t> b;
          if (!b.init(static_cast<acc_t>(loc_qm[2 * lp]), static_cast<acc_t>(loc_qm[2 * lp + 1]), h, w, stride)) {
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
      check_levels_cover(next_start, s.spatial);
      out[qm * s.channels + d] = static_cast<scalar_t>(acc);
    }
  }
}

// Sum over the group's lanes (all lanes of the group call it together).
template <typename acc_t>
__device__ inline acc_t group_sum(acc_t x, int group, unsigned mask) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset, group);
  return x;
}

template <typename scalar_t, typename loc_t, typename grad_value_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const loc_t* __restrict__ locations, const loc_t* __restrict__ weights,
                                grad_value_t* __restrict__ grad_value, loc_t* __restrict__ grad_loc,
                                loc_t* __restrict__ grad_attn, Dims s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int groups_per_block = blockDim.x / s.group;
  const int64_t num_groups = s.batch * s.queries * s.heads;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int lane = threadIdx.x % s.group;
  // The group's lanes within the warp (groups never straddle a warp: G divides 32).
  const unsigned mask =
      s.group == 32 ? 0xffffffffu : (((1u << s.group) - 1u) << ((threadIdx.x % 32) / s.group * s.group));
  const int64_t stride = s.heads * s.channels;
  for (int64_t qm = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / s.group; qm < num_groups;
       qm += groups_per_grid) {
    const int64_t n = qm / (s.queries * s.heads), m = qm % s.heads;
    const int64_t head_offset = n * s.spatial * stride + m * s.channels;
    const scalar_t* g = grad_out + qm * s.channels;
    const loc_t* loc_qm = locations + qm * s.levels * s.points * 2;
    const loc_t* attn_qm = weights + qm * s.levels * s.points;
    int64_t next_start = 0;
    for (int64_t l = 0; l < s.levels; ++l) {
      int64_t h, w, start;
      read_level(shapes, starts, l, s.spatial, next_start, h, w, start);
      const int64_t level_offset = head_offset + start * stride;
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t lp = l * s.points + p;
        Bilinear<acc_t> b;
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
          acc_t g_attn, g_x, g_y;
          b.gradients(dot, a, h, w, g_attn, g_x, g_y);
          grad_attn[sample] = static_cast<loc_t>(g_attn);
          grad_loc[2 * sample] = static_cast<loc_t>(g_x);
          grad_loc[2 * sample + 1] = static_cast<loc_t>(g_y);
        }
      }
    }
    check_levels_cover(next_start, s.spatial);
  }
}

}  // namespace msda
}  // namespace dino_detr
