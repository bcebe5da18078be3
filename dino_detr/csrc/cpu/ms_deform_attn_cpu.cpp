// CPU kernels of multi-scale deformable attention: forward for float32, float64 and a float16 /
// bfloat16 value (read as stored, with float32 locations, weights and accumulation, the result rounded
// once to value's dtype); backward for float32 and float64.
//
// Each sample (query q, head m, level l, point p) is bilinear (ms_deform_attn_sample.h, shared
// with the CUDA kernels): its four corner weights and offsets are computed once, then reused across the D contiguous channels of value[n, s, m, :],
// so the inner loops are plain vectorizable loops over D.
//   forward:  parallel over (n, q) rows; each thread owns its output rows.
//   backward: parallel over (n, m); each thread owns grad_value[n, :, m, :] and the location /
//             weight gradients of its head, so no two threads write the same element.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"

// The hot loops get an AVX2+FMA clone next to the baseline one, picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DINO_DETR_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define DINO_DETR_MULTIVERSION
#endif

// The half-value forward also gets an AVX-512 clone (wide bf16/f16 -> f32 conversions); it exists only for
// those dtypes, so the float32 and float64 results are the same as before it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DINO_DETR_MULTIVERSION_HALF __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define DINO_DETR_MULTIVERSION_HALF
#endif

namespace dino_detr {
namespace {

struct Level {
  int64_t height, width, start;
};

// Reads and validates the level layout (both tensors are small and on the CPU): the levels
// tile value's S axis in order. Overflow-safe: a layout whose sizes wrap around int64 is refused.
std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                               int64_t spatial) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  std::vector<Level> levels(spatial_shapes.size(0));
  int64_t next_start = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = {shapes[2 * l], shapes[2 * l + 1], starts[l]};
    TORCH_CHECK_VALUE(levels[l].height > 0 && levels[l].width > 0,
                      "ms_deform_attn: spatial_shapes must be positive (H, W), got (", levels[l].height, ", ",
                      levels[l].width, ") at level ", l);
    TORCH_CHECK_VALUE(levels[l].start == next_start, "ms_deform_attn: level_start_index[", l, "] is ",
                      levels[l].start, ", inconsistent with spatial_shapes (expected ", next_start, ")");
    int64_t size = 0;
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(levels[l].height, levels[l].width, &size) &&
                          !__builtin_add_overflow(next_start, size, &next_start),
                      "ms_deform_attn: spatial_shapes sum to more than 2**63 positions but value has S=", spatial);
  }
  TORCH_CHECK_VALUE(next_start == spatial, "ms_deform_attn: spatial_shapes sum to ", next_start,
                    " positions but value has S=", spatial);
  return levels;
}

template <typename T>
using Bilinear = msda::Bilinear<T>;

// T: value's dtype; A: the dtype of locations, weights and the arithmetic (T, or float for a half T).
template <typename T, typename A = T>
struct Problem {
  const T* value;
  const A* locations;
  const A* weights;
  const Level* levels;
  MSDASizes s;
};

// Issues prefetches for the D channels of a sample's corners (kWrite: for a read-modify-write).
// The samples of one (query, head) are independent random reads; prefetching all of them
// before using any keeps many cache misses in flight instead of one at a time.
template <int kWrite, typename A, typename T>
inline void prefetch_corners(const Bilinear<A>& b, const T* base, int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int c = 0; c < 4; ++c) {
    if (!b.valid[c]) continue;
    for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(base + b.offset[c] + d, kWrite, 3);
  }
}

// Output rows [begin, end) of the flattened (N * Lq) query axis. kD > 0 fixes D at compile time.
// Sums in A: directly in the output row when T == A, else in a row of A rounded once to T at the end.
template <typename T, typename A, int kD>
inline void forward_rows_impl(const Problem<T, A>& pb, T* out, int64_t begin, int64_t end) {
  const MSDASizes& s = pb.s;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t stride = s.heads * D;  // between two spatial positions of one head
  const int64_t samples = s.levels * s.points;
  std::vector<Bilinear<A>> bilinear(samples);
  std::vector<char> touches(samples);
  std::vector<A> row_acc(std::is_same<T, A>::value ? 0 : D);
  for (int64_t row = begin; row < end; ++row) {
    const T* value_n = pb.value + (row / s.queries) * s.spatial * stride;
    for (int64_t m = 0; m < s.heads; ++m) {
      const int64_t qm = row * s.heads + m;
      const A* loc = pb.locations + qm * samples * 2;
      const A* attn = pb.weights + qm * samples;
      for (int64_t i = 0; i < samples; ++i) {
        const Level& level = pb.levels[i / s.points];
        touches[i] = bilinear[i].init(loc[2 * i], loc[2 * i + 1], level.height, level.width, stride);
        if (touches[i]) prefetch_corners<0>(bilinear[i], value_n + level.start * stride + m * D, D);
      }
      A* __restrict__ acc;
      if constexpr (std::is_same<T, A>::value) {
        acc = out + qm * D;
      } else {
        acc = row_acc.data();
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = A(0);
      for (int64_t i = 0; i < samples; ++i) {
        if (!touches[i]) continue;
        const Bilinear<A>& b = bilinear[i];
        const T* value_l = value_n + pb.levels[i / s.points].start * stride + m * D;
        const A a = attn[i];
        if (b.all_valid) {
          const A w0 = a * b.weight[0], w1 = a * b.weight[1], w2 = a * b.weight[2], w3 = a * b.weight[3];
          const T* __restrict__ v0 = value_l + b.offset[0];
          const T* __restrict__ v1 = value_l + b.offset[1];
          const T* __restrict__ v2 = value_l + b.offset[2];
          const T* __restrict__ v3 = value_l + b.offset[3];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += w0 * static_cast<A>(v0[d]) + w1 * static_cast<A>(v1[d]) + w2 * static_cast<A>(v2[d]) +
                      w3 * static_cast<A>(v3[d]);
          }
        } else {
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            const A w = a * b.weight[c];
            const T* __restrict__ v = value_l + b.offset[c];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<A>(v[d]);
          }
        }
      }
      if constexpr (!std::is_same<T, A>::value) {
        T* __restrict__ o = out + qm * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
      }
    }
  }
}

template <typename T, int kD>
DINO_DETR_MULTIVERSION void forward_rows(const Problem<T>& pb, T* out, int64_t begin, int64_t end) {
  forward_rows_impl<T, T, kD>(pb, out, begin, end);
}

template <typename T, int kD>
DINO_DETR_MULTIVERSION_HALF void forward_rows_half(const Problem<T, float>& pb, T* out, int64_t begin, int64_t end) {
  forward_rows_impl<T, float, kD>(pb, out, begin, end);
}

// Gradients of batch n, head m (the (n, m) slice is owned by the calling thread).
template <typename T, int kD>
DINO_DETR_MULTIVERSION void backward_head(const Problem<T>& pb, const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn,
                   int64_t n, int64_t m) {
  const MSDASizes& s = pb.s;
  const int64_t D = kD > 0 ? kD : s.channels;
  const int64_t stride = s.heads * D;
  const int64_t head_offset = n * s.spatial * stride + m * D;
  const int64_t samples = s.levels * s.points;
  std::vector<Bilinear<T>> bilinear(samples);
  std::vector<char> touches(samples);
  for (int64_t q = 0; q < s.queries; ++q) {
    const int64_t qm = (n * s.queries + q) * s.heads + m;
    const T* __restrict__ g = grad_out + qm * D;
    const T* loc = pb.locations + qm * samples * 2;
    const T* attn = pb.weights + qm * samples;
    T* g_loc = grad_loc + qm * samples * 2;
    T* g_attn = grad_attn + qm * samples;
    for (int64_t i = 0; i < samples; ++i) {
      const Level& level = pb.levels[i / s.points];
      touches[i] = bilinear[i].init(loc[2 * i], loc[2 * i + 1], level.height, level.width, stride);
      if (touches[i]) {
        const int64_t level_offset = head_offset + level.start * stride;
        prefetch_corners<0>(bilinear[i], pb.value + level_offset, D);
        prefetch_corners<1>(bilinear[i], grad_value + level_offset, D);
      }
    }
    int64_t i = 0;
    for (int64_t l = 0; l < s.levels; ++l) {
      const Level& level = pb.levels[l];
      const int64_t level_offset = head_offset + level.start * stride;
      for (int64_t p = 0; p < s.points; ++p, ++i, ++attn, g_loc += 2, ++g_attn) {
        if (!touches[i]) continue;  // gradients stay 0
        const Bilinear<T>& b = bilinear[i];
        const T a = *attn;
        T dot[4] = {T(0), T(0), T(0), T(0)};  // <grad_out, corner value>
        if (b.all_valid) {
          const T w0 = a * b.weight[0], w1 = a * b.weight[1], w2 = a * b.weight[2], w3 = a * b.weight[3];
          const T* __restrict__ v0 = pb.value + level_offset + b.offset[0];
          const T* __restrict__ v1 = pb.value + level_offset + b.offset[1];
          const T* __restrict__ v2 = pb.value + level_offset + b.offset[2];
          const T* __restrict__ v3 = pb.value + level_offset + b.offset[3];
          T* __restrict__ gv0 = grad_value + level_offset + b.offset[0];
          T* __restrict__ gv1 = grad_value + level_offset + b.offset[1];
          T* __restrict__ gv2 = grad_value + level_offset + b.offset[2];
          T* __restrict__ gv3 = grad_value + level_offset + b.offset[3];
          T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
          for (int64_t d = 0; d < D; ++d) {
            const T gd = g[d];
            d0 += gd * v0[d];
            d1 += gd * v1[d];
            d2 += gd * v2[d];
            d3 += gd * v3[d];
            gv0[d] += w0 * gd;
            gv1[d] += w1 * gd;
            gv2[d] += w2 * gd;
            gv3[d] += w3 * gd;
          }
          dot[0] = d0, dot[1] = d1, dot[2] = d2, dot[3] = d3;
        } else {
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            const T w = a * b.weight[c];
            const T* __restrict__ v = pb.value + level_offset + b.offset[c];
            T* __restrict__ gv = grad_value + level_offset + b.offset[c];
            T dc = 0;
#pragma omp simd reduction(+ : dc)
            for (int64_t d = 0; d < D; ++d) {
              dc += g[d] * v[d];
              gv[d] += w * g[d];
            }
            dot[c] = dc;
          }
        }
        b.gradients(dot, a, level.height, level.width, *g_attn, g_loc[0], g_loc[1]);
      }
    }
  }
}

// Calls fn.template operator()<kD>() with D fixed for the common head sizes.
template <typename Fn>
void dispatch_channels(int64_t channels, const Fn& fn) {
  switch (channels) {
    case 16: fn(std::integral_constant<int, 16>()); break;
    case 32: fn(std::integral_constant<int, 32>()); break;
    case 64: fn(std::integral_constant<int, 64>()); break;
    default: fn(std::integral_constant<int, 0>()); break;
  }
}

// The backward on the CPU: float32 and float64 (a half value is an inference-only input here).
void check_cpu_backward(const at::Tensor& value) {
  TORCH_CHECK_TYPE(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
                   "ms_deform_attn_backward: a ", dtype_name(value.scalar_type()),
                   " value has no gradient on the CPU (its forward is for inference); use float32 or float64 "
                   "for training on the CPU");
}

// Rows [0, N * Lq) in parallel; about 32k multiply-adds per task.
template <typename Fn>
void parallel_rows(const MSDASizes& s, const Fn& fn) {
  const int64_t work_per_row = std::max<int64_t>(1, s.heads * s.levels * s.points * s.channels);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, s.batch * s.queries, grain, fn);
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const MSDASizes s =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, s.spatial);
  at::Tensor out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble) {
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
      const Problem<scalar_t> pb{value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                                 attention_weights.data_ptr<scalar_t>(), levels.data(), s};
      scalar_t* out_ptr = out.data_ptr<scalar_t>();
      dispatch_channels(s.channels, [&](auto kD) {
        parallel_rows(s, [&](int64_t begin, int64_t end) {
          forward_rows<scalar_t, decltype(kD)::value>(pb, out_ptr, begin, end);
        });
      });
    });
    return out;
  }
  // A float16 / bfloat16 value is read as stored; locations and weights in float32 (the rare half ones
  // are widened once: sampling positions are computed in float32 either way).
  const at::Tensor loc = sampling_locations.to(at::kFloat);
  const at::Tensor attn = attention_weights.to(at::kFloat);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_half", [&] {
    const Problem<scalar_t, float> pb{value.data_ptr<scalar_t>(), loc.data_ptr<float>(), attn.data_ptr<float>(),
                                      levels.data(), s};
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    dispatch_channels(s.channels, [&](auto kD) {
      parallel_rows(s, [&](int64_t begin, int64_t end) {
        forward_rows_half<scalar_t, decltype(kD)::value>(pb, out_ptr, begin, end);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MSDASizes s =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu_backward(value);
  check_grad_output(grad_output, value, s);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, s.spatial);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const Problem<scalar_t> pb{value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                               attention_weights.data_ptr<scalar_t>(), levels.data(), s};
    const scalar_t* g = grad_output.data_ptr<scalar_t>();
    scalar_t* gv = grad_value.data_ptr<scalar_t>();
    scalar_t* gl = grad_loc.data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.data_ptr<scalar_t>();
    dispatch_channels(s.channels, [&](auto kD) {
      at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          backward_head<scalar_t, decltype(kD)::value>(pb, g, gv, gl, ga, task / s.heads, task % s.heads);
        }
      });
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dino_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace dino_detr
