// Channel-vectorised CUDA kernels of multi-scale deformable attention, beside the baseline of
// ms_deform_attn_kernels.cuh (design notes and the arithmetic behind them: KERNELS.md).
//
// One lane handles V = 16 / sizeof(scalar_t) consecutive channels (4 float, 2 double, 8 half or
// bfloat16): its group of G lanes (G = a power of two >= ceil(D / V), at most 32) covers one
// (n, q, m). Each lane computes a sample's bilinear corners once for its V channels (the baseline
// recomputes them per channel) and moves them with one 16-byte access per corner when the call
// allows (`vector_io`: D a multiple of V and every buffer 16-byte aligned, so every row slice of V
// channels is aligned); otherwise, and for the last, partial slice of a row, it moves them one
// element at a time. Same summation order per channel as the baseline forward, so the forward
// results are bitwise the baseline's.
//
// The backward hands each lane's V contributions to grad_value to a Sink:
//   AtomicSink:     float atomics (4-wide float4 atomics on sm_90 for whole aligned slices, one
//                   scalar atomic per channel elsewhere: the path the host emulation runs).
//   FixedPointSink: the deterministic mode: integer atomics on round(x * 2^e) in int64, whose sum
//                   is exact and so independent of the order of the additions; e is chosen per call
//                   from a bound on every partial sum (the `bounds` the caller computes:
//                   max |grad_output|, max |attention_weights| over their finite elements), see
//                   FixedPointSink.
// The location and weight gradients are reduced across the group by a fixed shuffle tree and
// written by its first lane, as in the baseline (deterministic in both sinks).
#pragma once

#include <cmath>
#include <type_traits>

#include "ms_deform_attn_kernels.cuh"

#if defined(__CUDACC__) || !defined(__GNUC__)
#define MSDA_MAY_ALIAS
#else
#define MSDA_MAY_ALIAS [[gnu::may_alias]]  // the host emulation reads T arrays through Pack
#endif

// A 16-byte access needs a 16-byte aligned address (a GPU stops the kernel with "misaligned
// address" otherwise); the host emulation checks it here.
#ifndef MSDA_CHECK_ALIGNED
#define MSDA_CHECK_ALIGNED(pointer, bytes)
#endif

namespace dino_detr {
namespace msda {

// Channels per lane: one 16-byte access.
template <typename scalar_t>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(scalar_t));

template <typename T, int V>
struct alignas(sizeof(T) * V) MSDA_MAY_ALIAS Pack {
  T x[V];
};

// x[0, n) = p[0, n) (n <= V), the rest 0: one 16-byte load when `whole` (n == V, p aligned).
template <int V, typename acc_t, typename T>
__device__ inline void load_slice(const T* p, int n, bool whole, acc_t (&x)[V]) {
  if (whole) {
    MSDA_CHECK_ALIGNED(p, sizeof(Pack<T, V>));
    const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int v = 0; v < V; ++v) x[v] = static_cast<acc_t>(pack.x[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) x[v] = v < n ? static_cast<acc_t>(p[v]) : acc_t(0);
  }
}

// p[0, n) = x[0, n): one 16-byte store when `whole`.
template <int V, typename acc_t, typename T>
__device__ inline void store_slice(T* p, int n, bool whole, const acc_t (&x)[V]) {
  if (whole) {
    MSDA_CHECK_ALIGNED(p, sizeof(Pack<T, V>));
    Pack<T, V> pack;
#pragma unroll
    for (int v = 0; v < V; ++v) pack.x[v] = static_cast<T>(x[v]);
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (v < n) p[v] = static_cast<T>(x[v]);
    }
  }
}

template <typename scalar_t, typename loc_t>
__global__ void forward_vec_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts, const loc_t* __restrict__ locations,
                                   const loc_t* __restrict__ weights, scalar_t* __restrict__ out, Dims s,
                                   bool vector_io) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVecWidth<scalar_t>;
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
    for (int64_t d = static_cast<int64_t>(lane) * V; d < s.channels; d += static_cast<int64_t>(s.group) * V) {
      const int width = static_cast<int>(std::min<int64_t>(V, s.channels - d));
      const bool whole = vector_io && width == V;
      acc_t acc[V] = {};
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
          acc_t sampled[V] = {};
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            acc_t x[V];
            load_slice<V>(v + b.offset[c], width, whole, x);
#pragma unroll
            for (int k = 0; k < V; ++k) sampled[k] += b.weight[c] * x[k];
          }
          const acc_t a = static_cast<acc_t>(attn_qm[lp]);
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += a * sampled[k];
        }
      }
      check_levels_cover(next_start, s.spatial);
      store_slice<V>(out + qm * s.channels + d, width, whole, acc);
    }
  }
}

// grad_value += x by atomics (value_t: the grad_value buffer's type; x in the kernel's acc_t).
template <typename value_t>
struct AtomicSink {
  value_t* grad_value;

  __device__ void prepare(const Dims&) {}

  template <int V, typename acc_t>
  __device__ void add(int64_t index, const acc_t (&x)[V], int width, bool whole) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (std::is_same_v<value_t, float> && std::is_same_v<acc_t, float> && V % 4 == 0) {
      if (whole) {  // sm_90's 4-wide float atomics (global memory, 16-byte aligned)
#pragma unroll
        for (int k = 0; k < V; k += 4) {
          atomicAdd(reinterpret_cast<float4*>(grad_value + index + k), make_float4(x[k], x[k + 1], x[k + 2], x[k + 3]));
        }
        return;
      }
    }
#endif
    (void)whole;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < width) atomicAdd(grad_value + index + k, x[k]);
    }
  }
};

// The exponent e of FixedPointSink for `count` contributions per element (0 when the bound is 0,
// i.e. every finite contribution is 0, or overflows a double).
__host__ __device__ inline int fixed_point_exponent(const double* bounds, int64_t count) {
  const double bound = static_cast<double>(count) * bounds[0] * bounds[1];
  if (!(bound > 0 && bound <= 1.7976931348623157e308)) return 0;
  int k;
#ifdef __CUDA_ARCH__
  frexp(bound, &k);  // bound < 2^k
#else
  std::frexp(bound, &k);
#endif
  return 61 - k;
}

// Deterministic grad_value: every contribution x becomes the integer round(x * 2^e), summed by
// 64-bit integer atomics (exact, so the sum is the same in any order), and the finishing kernel
// writes sum * 2^-e. e is the largest exponent with B * 2^e < 2^61, B = Lq * P * max|grad_output|
// * max|attention_weights| bounding the magnitude of every partial sum (an element of value gets
// at most one contribution a * w * g, |w| <= 1, from each of the Lq * P samples of its (n, m, l)),
// so no sum overflows. Error: at most half a unit, 2^-(e+1) <= B * 2^-61, per contribution, so
// |error| <= (Lq * P)^2 * max|g| * max|a| * 2^-61 per element, plus the final rounding to acc_t
// (DINO's encoder, Lq * P = 2^17.4: 2^-26 * max|g| * max|a|, near float32's own rounding).
// A contribution that does not fit (from non-finite inputs, which the bounds leave out) goes to the
// float buffer by a float atomic: a sum containing NaN or infinities is NaN or the infinity
// whatever the order.
template <typename value_t>
struct FixedPointSink {
  unsigned long long* fixed;  // two's-complement int64 sums (unsigned: wrap-around is defined)
  value_t* overflow;          // the grad_value buffer: non-finite contributions
  const double* bounds;       // {max |grad_output|, max |attention_weights|}, finite elements only
  int exponent = 0;

  __device__ void prepare(const Dims& s) { exponent = fixed_point_exponent(bounds, s.queries * s.points); }

  template <int V, typename acc_t>
  __device__ void add(int64_t index, const acc_t (&x)[V], int width, bool) const {
    constexpr acc_t limit = acc_t(4611686018427387904.0);  // 2^62
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k >= width) continue;
      const acc_t y = ldexp_of(x[k], exponent);
      if (y < limit && y > -limit) {
        atomicAdd(fixed + index + k, static_cast<unsigned long long>(round_to_int64(y)));
      } else {
        atomicAdd(overflow + index + k, x[k]);
      }
    }
  }

  template <typename T>
  __device__ static T ldexp_of(T x, int e) {
#ifdef __CUDA_ARCH__
    return ldexp(x, e);
#else
    return std::ldexp(x, e);
#endif
  }

  template <typename T>
  __device__ static long long round_to_int64(T x) {
#ifdef __CUDA_ARCH__
    return llrint(x);
#else
    return std::llrint(x);
#endif
  }
};

// grad_value[i] += fixed[i] * 2^-e (after the backward kernel).
template <typename value_t>
__global__ void fixed_point_finish_kernel(const unsigned long long* __restrict__ fixed,
                                          value_t* __restrict__ grad_value, int64_t numel,
                                          const double* __restrict__ bounds, int64_t count) {
  using real_t = at::opmath_type<value_t>;
  const int e = fixed_point_exponent(bounds, count);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const real_t sum = static_cast<real_t>(static_cast<long long>(fixed[i]));
    grad_value[i] = static_cast<value_t>(static_cast<real_t>(grad_value[i]) +
                                         FixedPointSink<value_t>::ldexp_of(sum, -e));
  }
}

template <typename scalar_t, typename loc_t, typename Sink>
__global__ void backward_vec_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                    const loc_t* __restrict__ locations, const loc_t* __restrict__ weights, Sink sink,
                                    loc_t* __restrict__ grad_loc, loc_t* __restrict__ grad_attn, Dims s,
                                    bool vector_io) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kVecWidth<scalar_t>;
  sink.prepare(s);
  const int groups_per_block = blockDim.x / s.group;
  const int64_t num_groups = s.batch * s.queries * s.heads;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int lane = threadIdx.x % s.group;
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
        // Uniform over the group, so the shuffles below see all its lanes.
        if (!b.init(static_cast<acc_t>(loc_qm[2 * lp]), static_cast<acc_t>(loc_qm[2 * lp + 1]), h, w, stride)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn_qm[lp]);
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t d = static_cast<int64_t>(lane) * V; d < s.channels; d += static_cast<int64_t>(s.group) * V) {
          const int width = static_cast<int>(std::min<int64_t>(V, s.channels - d));
          const bool whole = vector_io && width == V;
          acc_t gd[V];
          load_slice<V>(g + d, width, whole, gd);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            const int64_t index = level_offset + b.offset[c] + d;
            acc_t x[V];
            load_slice<V>(value + index, width, whole, x);
            const acc_t aw = a * b.weight[c];
            acc_t contribution[V];
#pragma unroll
            for (int k = 0; k < V; ++k) {
              dot[c] += gd[k] * x[k];
              contribution[k] = aw * gd[k];
            }
            sink.add(index, contribution, width, whole);
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
