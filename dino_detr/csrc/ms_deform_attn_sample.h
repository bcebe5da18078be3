// Per-sample math of multi-scale deformable attention, the one source for the CPU kernel
// (cpu/ms_deform_attn_cpu.cpp) and the CUDA kernels (cuda/ms_deform_attn_kernels.cuh):
// level bounds, bilinear corners (weights, validity, offsets) and the gradient formulas.
//
// Rounding: the pixel coordinate `loc * W - 0.5` and the gradient sums are explicit fused
// multiply-adds, so nvcc (which contracts a * b + c into an FMA by itself) and the host compiler
// (which may not) round them alike and pick the same corners at exact pixel centres.
// Light on purpose (no ATen): the host emulation of the CUDA kernels includes it too.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSDA_HOST_DEVICE __host__ __device__
#else
#define MSDA_HOST_DEVICE
#endif

namespace dino_detr {

// Sizes of one call, read from the checked inputs.
struct MSDASizes {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

namespace msda {

template <typename T>
MSDA_HOST_DEVICE inline T fused_mul_add(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

template <typename T>
MSDA_HOST_DEVICE inline T floor_of(T x) {
#ifdef __CUDA_ARCH__
  return floor(x);
#else
  return std::floor(x);
#endif
}

// True when a level of h x w positions starting at `start` is the next tile of value's S axis:
// positive shape, starting where the previous level ended (`next_start`, <= spatial) and ending
// inside S. Never overflows: h * w is only formed once h <= (spatial - start) / w.
MSDA_HOST_DEVICE inline bool level_fits(int64_t h, int64_t w, int64_t start, int64_t next_start, int64_t spatial) {
  return h > 0 && w > 0 && start == next_start && start <= spatial && h <= (spatial - start) / w;
}

// One bilinear sample of an h x w level: the four corners (y0,x0), (y0,x1), (y1,x0), (y1,x1),
// their weights (without the attention weight), validity and element offsets from the level's
// first position (`position_stride` elements per position). A corner outside the map is invalid.
template <typename T>
struct Bilinear {
  T fx, fy;  // fractional position inside the cell
  T weight[4];
  int64_t offset[4];
  bool valid[4];
  bool all_valid;

  // loc_x, loc_y: normalized location (pixel centres at (i + 0.5) / W). False when the sample
  // touches no pixel (also for NaN and infinite locations).
  MSDA_HOST_DEVICE inline bool init(T loc_x, T loc_y, int64_t h, int64_t w, int64_t position_stride) {
    const T x = fused_mul_add(loc_x, static_cast<T>(w), T(-0.5));
    const T y = fused_mul_add(loc_y, static_cast<T>(h), T(-0.5));
    if (!(x > T(-1) && y > T(-1) && x < static_cast<T>(w) && y < static_cast<T>(h))) return false;
    const T x0f = floor_of(x), y0f = floor_of(y);
    const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
    fx = x - x0f;
    fy = y - y0f;
    const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < w, in_y0 = y0 >= 0, in_y1 = y0 + 1 < h;
    valid[0] = in_y0 && in_x0;
    valid[1] = in_y0 && in_x1;
    valid[2] = in_y1 && in_x0;
    valid[3] = in_y1 && in_x1;
    all_valid = valid[0] && valid[1] && valid[2] && valid[3];
    weight[0] = (T(1) - fy) * (T(1) - fx);
    weight[1] = (T(1) - fy) * fx;
    weight[2] = fy * (T(1) - fx);
    weight[3] = fy * fx;
    offset[0] = (y0 * w + x0) * position_stride;
    offset[1] = offset[0] + position_stride;
    offset[2] = offset[0] + w * position_stride;
    offset[3] = offset[2] + position_stride;
    return true;
  }

  // Gradients of one sample from dot[c] = <grad_out, corner c's value> (0 for an invalid corner)
  // and its attention weight a: d/d attention weight, d/d loc_x (scaled by W), d/d loc_y (by H).
  MSDA_HOST_DEVICE inline void gradients(const T dot[4], T a, int64_t h, int64_t w, T& grad_attn, T& grad_x,
                                         T& grad_y) const {
    grad_attn = fused_mul_add(weight[3], dot[3],
                              fused_mul_add(weight[2], dot[2], fused_mul_add(weight[1], dot[1], weight[0] * dot[0])));
    const T dfx = fused_mul_add(T(1) - fy, dot[1] - dot[0], fy * (dot[3] - dot[2]));
    const T dfy = fused_mul_add(T(1) - fx, dot[2] - dot[0], fx * (dot[3] - dot[1]));
    grad_x = a * static_cast<T>(w) * dfx;
    grad_y = a * static_cast<T>(h) * dfy;
  }
};

}  // namespace msda
}  // namespace dino_detr
