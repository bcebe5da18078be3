// The CUDA kernels and launch code of dino_detr/csrc/cuda/ (ms_deform_attn_launch.cuh and the kernel
// variants it launches), compiled for the host behind cuda_emu.h, with a C interface for ctypes
// (msda_emu.py). Each call copies its inputs and outputs into buffers of exactly their size, so
// AddressSanitizer's redzones sit right after every tensor, and the output buffers start as the
// caller filled them (e.g. NaN, to prove that the forward writes every element).
#include <ATen/OpMathType.h>  // before cuda_emu.h: c10's headers see a plain host build

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <type_traits>
#include <vector>

#include "cuda_emu.h"
#include "cuda/ms_deform_attn_launch.cuh"

namespace {
using dino_detr::MSDASizes;

// Launches through the emulator, with at most max_blocks blocks when positive (a small "GPU":
// the kernels' grid-stride loops must cover the rest).
struct EmuBackend {
  int64_t max_blocks;

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned blocks, unsigned threads, Args... args) const {
    if (max_blocks > 0) blocks = static_cast<unsigned>(std::min<int64_t>(blocks, max_blocks));
    cuda_emu::launch(dim3{blocks, 1, 1}, dim3{threads, 1, 1}, [&] { kernel(args...); });
  }
};

// Elements by which every buffer starts past its allocation (msda_emu_set_misalign: 1 moves each
// tensor off the 16-byte alignment that the vectorized kernels' vector accesses need).
int64_t misalign = 0;

template <typename T>
struct Buffer {
  int64_t offset = misalign;
  std::vector<T> data;
  void* user;
  Buffer(void* p, int64_t n) : data(offset + n), user(p) {
    std::copy(static_cast<T*>(p), static_cast<T*>(p) + n, data.begin() + offset);
  }
  T* ptr() { return data.data() + offset; }
  void copy_back() const { std::copy(data.begin() + offset, data.end(), static_cast<T*>(user)); }
};

struct Args {
  void *value, *shapes, *starts, *locations, *weights;
};

template <typename scalar_t, typename loc_t>
void forward(const Args& a, int kernel, void* out, const MSDASizes& s, int64_t max_blocks) {
  const int64_t samples = s.batch * s.queries * s.heads * s.levels * s.points;
  Buffer<scalar_t> value(a.value, s.batch * s.spatial * s.heads * s.channels);
  Buffer<int64_t> shapes(a.shapes, 2 * s.levels), starts(a.starts, s.levels);
  Buffer<loc_t> locations(a.locations, 2 * samples), weights(a.weights, samples);
  Buffer<scalar_t> o(out, s.batch * s.queries * s.heads * s.channels);
  dino_detr::msda::launch_forward(EmuBackend{max_blocks}, static_cast<dino_detr::msda::ForwardKernel>(kernel),
                                  value.ptr(), shapes.ptr(), starts.ptr(),
                                  locations.ptr(), weights.ptr(), o.ptr(), s);
  o.copy_back();
}

// grad_value is handed over in the accumulation type (float32 for the half types), as the .cu allocates it.
// max |x| over the finite elements (as the .cu computes the deterministic backward's bounds).
template <typename T>
double max_finite_abs(const std::vector<T>& x) {
  double m = 0;
  for (const T& v : x) {
    const double a = std::fabs(static_cast<double>(v));
    if (std::isfinite(a)) m = std::max(m, a);
  }
  return m;
}

// The deterministic backward's workspace, as the .cu allocates it.
struct Workspace {
  std::vector<unsigned long long> fixed;
  double bounds[2];
};

template <typename scalar_t, typename loc_t>
void backward(const Args& a, int kernel, void* grad_out, void* grad_value, void* grad_loc, void* grad_attn,
              const MSDASizes& s, int64_t max_blocks) {
  using grad_value_t = dino_detr::msda::grad_value_acc_t<scalar_t>;
  const int64_t samples = s.batch * s.queries * s.heads * s.levels * s.points;
  const int64_t values = s.batch * s.spatial * s.heads * s.channels;
  Buffer<scalar_t> g(grad_out, s.batch * s.queries * s.heads * s.channels), value(a.value, values);
  Buffer<int64_t> shapes(a.shapes, 2 * s.levels), starts(a.starts, s.levels);
  Buffer<loc_t> locations(a.locations, 2 * samples), weights(a.weights, samples);
  Buffer<grad_value_t> gv(grad_value, values);
  Buffer<loc_t> gl(grad_loc, 2 * samples), ga(grad_attn, samples);
  Workspace work{std::vector<unsigned long long>(values), {max_finite_abs(g.data), max_finite_abs(weights.data)}};
  dino_detr::msda::launch_backward(EmuBackend{max_blocks}, static_cast<dino_detr::msda::BackwardKernel>(kernel),
                                   g.ptr(), value.ptr(), shapes.ptr(), starts.ptr(),
                                   locations.ptr(), weights.ptr(), gv.ptr(), gl.ptr(),
                                   ga.ptr(), s, {work.fixed.data(), work.bounds});
  gv.copy_back();
  gl.copy_back();
  ga.copy_back();
}

// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Calls fn(scalar_t{}, loc_t{}).
template <typename Fn>
void dispatch(int value_dtype, int loc_dtype, const Fn& fn) {
  const bool same = value_dtype == loc_dtype;
  if (value_dtype == 0 && same) return fn(float{}, float{});
  if (value_dtype == 1 && same) return fn(double{}, double{});
  if (value_dtype == 2 && same) return fn(c10::Half{}, c10::Half{});
  if (value_dtype == 3 && same) return fn(c10::BFloat16{}, c10::BFloat16{});
  if (value_dtype == 2 && loc_dtype == 0) return fn(c10::Half{}, float{});
  if (value_dtype == 3 && loc_dtype == 0) return fn(c10::BFloat16{}, float{});
  throw cuda_emu::Error("unsupported dtype pair " + std::to_string(value_dtype) + ", " + std::to_string(loc_dtype));
}

MSDASizes sizes_of(const int64_t* z) { return {z[0], z[1], z[2], z[3], z[4], z[5], z[6]}; }

// Returns 0, or 1 with the error message in err.
template <typename Fn>
int guarded(char* err, int err_size, const Fn& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    snprintf(err, err_size, "%s", e.what());
    return 1;
  }
}
}  // namespace

// Self-test of the emulator's warp rules on small kernels of one 64-thread block; `kind`:
// 0 a correct xor reduction over each warp (writes the sum into *out), 1 a mask without the
// calling lane, 2 a mask naming a lane that has exited, 3 lanes of one mask at different calls,
// 4 a source lane outside the mask, 5 a misaligned 16-byte access. Returns 0, or 1 with the emulator's error in err.
extern "C" int cuda_emu_selftest(int kind, int* out, char* err, int err_size) {
  return guarded(err, err_size, [&] {
    cuda_emu::launch(dim3{1, 1, 1}, dim3{64, 1, 1}, [&] {
      const int lane = threadIdx.x % 32;
      int x = lane;
      switch (kind) {
        case 0:
          for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
          if (threadIdx.x == 0) *out = x;
          break;
        case 1: __shfl_xor_sync(0x0000ffffu, x, 1); break;
        case 2:
          if (lane == 31) return;
          __shfl_xor_sync(0xffffffffu, x, 1);
          break;
        case 3:
          if (lane % 2) __shfl_xor_sync(0xffffffffu, x, 1);
          else __shfl_xor_sync(0xffffffffu, x, 1);
          break;
        case 4: __shfl_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, x, 16); break;
        default: {
          alignas(16) float row[8] = {};
          MSDA_CHECK_ALIGNED(row + 4, 16);  // aligned: passes
          MSDA_CHECK_ALIGNED(row + 1, 16);
        }
      }
    });
  });
}

// Self-test of the emulator's schedule: 2 blocks of 4 threads write their global thread number
// into out[0..8) in the order they run (rt.reverse: 7, 6, ..., 0).
extern "C" int cuda_emu_schedule_order(int* out, char* err, int err_size) {
  return guarded(err, err_size, [&] {
    int next = 0;
    cuda_emu::launch(dim3{2, 1, 1}, dim3{4, 1, 1}, [&] { out[next++] = blockIdx.x * blockDim.x + threadIdx.x; });
  });
}

// dtype code of the grad_value buffer the backward accumulates into, for a value of value_dtype.
extern "C" int msda_emu_grad_value_dtype(int value_dtype) {
  int code = -1;
  dispatch(value_dtype, value_dtype, [&](auto scalar, auto) {
    using acc_t = dino_detr::msda::grad_value_acc_t<decltype(scalar)>;
    code = std::is_same_v<acc_t, float> ? 0 : std::is_same_v<acc_t, double> ? 1
         : std::is_same_v<acc_t, c10::Half> ? 2 : 3;
  });
  return code;
}

// sizes: (N, S, M, D, Lq, L, P).
// Kernel variants (ms_deform_attn_launch.cuh): the name of forward (stage 0) or backward (stage 1)
// kernel `index`, or nullptr past the last.
extern "C" const char* msda_emu_kernel_name(int stage, int index) {
  using namespace dino_detr::msda;
  if (index < 0) return nullptr;
  if (stage == 0) {
    return index < static_cast<int>(std::size(kForwardKernelNames)) ? kForwardKernelNames[index] : nullptr;
  }
  return index < static_cast<int>(std::size(kBackwardKernelNames)) ? kBackwardKernelNames[index] : nullptr;
}

extern "C" void msda_emu_set_misalign(int elements) { misalign = elements; }

// The emulator's schedule: 0 blocks and threads in order, 1 both reversed (another order of the
// atomics, as another GPU run may have).
extern "C" void cuda_emu_set_reverse(int reverse) { cuda_emu::rt.reverse = reverse != 0; }

extern "C" int msda_emu_forward(int kernel, int value_dtype, int loc_dtype, void* value, void* shapes, void* starts,
                                void* locations, void* weights, void* out, const int64_t* sizes, int64_t max_blocks,
                                char* err, int err_size) {
  return guarded(err, err_size, [&] {
    dispatch(value_dtype, loc_dtype, [&](auto scalar, auto loc) {
      forward<decltype(scalar), decltype(loc)>({value, shapes, starts, locations, weights}, kernel, out,
                                               sizes_of(sizes), max_blocks);
    });
  });
}

extern "C" int msda_emu_backward(int kernel, int value_dtype, int loc_dtype, void* grad_out, void* value, void* shapes,
                                 void* starts, void* locations, void* weights, void* grad_value, void* grad_loc,
                                 void* grad_attn, const int64_t* sizes, int64_t max_blocks, char* err, int err_size) {
  return guarded(err, err_size, [&] {
    dispatch(value_dtype, loc_dtype, [&](auto scalar, auto loc) {
      backward<decltype(scalar), decltype(loc)>({value, shapes, starts, locations, weights}, kernel, grad_out,
                                                grad_value, grad_loc, grad_attn, sizes_of(sizes), max_blocks);
    });
  });
}
