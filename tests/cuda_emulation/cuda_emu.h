// Host emulation of the CUDA features used by dino_detr/csrc/cuda/ms_deform_attn_kernels.cuh, so
// that the kernels compile for the CPU and run in CI without a GPU (portable: POSIX ucontext to
// start a fiber, the compiler's setjmp/longjmp builtins to switch; x86-64 and aarch64 alike).
//
// A launch runs its blocks one after another; each CUDA thread of a block is a fiber with its own
// stack, run until it ends or reaches a warp-synchronous call. Strict warp semantics (what is
// undefined on a GPU is an error here):
//   - __shfl_*_sync completes only when every lane named in its mask waits at the same call
//     (source site, mask, mode and width); a mask that omits the caller or names a lane outside
//     the block, a named lane that has exited or waits at another call, and a source lane outside
//     the mask are reported.
//   - atomicAdd is a plain add (one OS thread runs all fibers), so the order of a launch's atomics
//     is its schedule's: `rt.reverse` runs the blocks and the threads of each block in reverse
//     order, another schedule a GPU may have (what proves a kernel's results independent of it).
//   - MSDA_KERNEL_ASSERT failing aborts the launch with its message (a device-side assertion).
//   - MSDA_CHECK_ALIGNED (the kernels' vector accesses) aborts the launch on an address that is not
//     a multiple of the access size, as a GPU does ("misaligned address").
// Errors surface as cuda_emu::Error thrown by launch(). Build with
// -fsanitize=address,undefined to check the kernels' indexing and integer arithmetic too.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace cuda_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State { ready, shuffle, done };

struct Shuffle {  // a pending __shfl_*_sync
  const char* file;
  int line, mode, width;
  unsigned mask, operand;  // operand: lane mask (xor), delta (down, up) or source lane (idx)
  uint64_t in, out;
};

// A switch saves and restores only what the compiler needs (GCC and Clang builtins: no signal
// mask, no libc unwinding, not intercepted by sanitizers; it must not be taken in the function
// that saved the buffer, hence jump()).
using JumpBuffer = void* [5];

[[noreturn]] __attribute__((noinline)) inline void jump(JumpBuffer& target) { __builtin_longjmp(target, 1); }

struct Fiber {
  std::vector<char> stack;
  ucontext_t start;
  JumpBuffer resume;
  bool started = false;
  State state = State::ready;
  void* fake_stack = nullptr;  // AddressSanitizer's fake stack while switched out
  Shuffle shuffle{};
};

struct Runtime {
  dim3 grid_dim, block_dim, block_idx, thread_idx;
  std::vector<Fiber> fibers;
  int current = -1;
  JumpBuffer scheduler;
  ucontext_t scheduler_context;
  const std::function<void()>* body = nullptr;
  std::string error;  // set by a fiber (device-side assertion), thrown by the scheduler
  bool reverse = false;  // blocks and threads in reverse order
#ifdef CUDA_EMU_ASAN
  void* fake_stack = nullptr;  // the scheduler's, while a fiber runs
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

inline Runtime rt;

// ---- context switches (with AddressSanitizer told about every change of stack) ----

inline void before_switch_to_fiber(Fiber& f) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&rt.fake_stack, f.stack.data(), f.stack.size());
#else
  (void)f;
#endif
}

inline void after_switch_to_scheduler() {
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(rt.fake_stack, nullptr, nullptr);
#endif
}

// exiting: the fiber never resumes (its fake stack is dropped).
inline void before_switch_to_scheduler(bool exiting) {
#ifdef CUDA_EMU_ASAN
  Fiber& f = rt.fibers[rt.current];
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, rt.scheduler_stack_bottom,
                                 rt.scheduler_stack_size);
#else
  (void)exiting;
#endif
}

inline void after_switch_to_fiber(void* fake_stack) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &rt.scheduler_stack_bottom, &rt.scheduler_stack_size);
#else
  (void)fake_stack;
#endif
}

// Suspends the current fiber (it resumes where it stopped).
inline void yield() {
  Fiber& f = rt.fibers[rt.current];
  if (__builtin_setjmp(f.resume) == 0) {
    before_switch_to_scheduler(false);
    jump(rt.scheduler);
  }
  after_switch_to_fiber(rt.fibers[rt.current].fake_stack);
}

// Abandons the current fiber mid-kernel (a failed launch); it restarts from scratch next time.
[[noreturn]] inline void exit_fiber() {
  Fiber& f = rt.fibers[rt.current];
  f.state = State::done;
  f.started = false;
  before_switch_to_scheduler(true);
  jump(rt.scheduler);
}

// A fiber runs the kernel body once per block, parking in between (started once per launch
// series, not per block: starting a context is the expensive part).
inline void fiber_main() {
  after_switch_to_fiber(nullptr);
  for (;;) {
    (*rt.body)();
    rt.fibers[rt.current].state = State::done;
    yield();
  }
}

// Runs fiber t until it yields or ends.
inline void run_fiber(int t) {
  Fiber& f = rt.fibers[t];
  rt.current = t;
  const unsigned x = rt.block_dim.x, y = rt.block_dim.y;
  rt.thread_idx = {t % x, t / x % y, t / (x * y)};
  if (__builtin_setjmp(rt.scheduler) == 0) {
    before_switch_to_fiber(f);
    if (!f.started) {
      f.started = true;
#ifdef CUDA_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f.stack.data(), f.stack.size());  // frames abandoned by a failed launch
#endif
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = f.stack.data();
      f.start.uc_stack.ss_size = f.stack.size();
      f.start.uc_link = nullptr;
      makecontext(&f.start, &fiber_main, 0);
      swapcontext(&rt.scheduler_context, &f.start);  // never returns: the fiber jumps back
    } else {
      jump(f.resume);
    }
  }
  after_switch_to_scheduler();
  rt.current = -1;
}

// ---- warp-synchronous calls ----

[[noreturn]] inline void fail(const std::string& message) { throw Error(message); }

inline std::string site(const Shuffle& s) { return std::string(s.file) + ":" + std::to_string(s.line); }

inline std::string hex(unsigned mask) {
  char buf[16];
  snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

inline bool same_call(const Shuffle& a, const Shuffle& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0 && a.mask == b.mask && a.mode == b.mode &&
         a.width == b.width;
}

// Source lane of `lane` for a shuffle (PTX shfl.sync with c = ((32 - width) << 8) | 31), or
// `lane` itself when the source falls outside its segment.
inline unsigned source_lane(const Shuffle& s, unsigned lane) {
  const unsigned segment = ~static_cast<unsigned>(s.width - 1) & 31u;  // lanes of one segment share these bits
  const unsigned first = lane & segment, last = first | (static_cast<unsigned>(s.width) - 1);
  int64_t j;
  switch (s.mode) {
    case 0: j = lane ^ s.operand; break;                                     // xor
    case 1: j = static_cast<int64_t>(lane) + s.operand; break;               // down
    case 2: j = static_cast<int64_t>(lane) - s.operand; break;               // up
    default: j = first | (s.operand & (static_cast<unsigned>(s.width) - 1)); // idx
  }
  return j >= first && j <= last ? static_cast<unsigned>(j) : lane;
}

// Completes every shuffle whose named lanes all wait at it; returns how many lanes it released.
// Throws on a lane that can never complete its shuffle.
inline int resolve_shuffles(int threads) {
  int released = 0;
  for (int warp = 0; warp < threads; warp += 32) {
    const int lanes = std::min(32, threads - warp);
    const unsigned existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    for (int lane = 0; lane < lanes; ++lane) {
      Fiber& f = rt.fibers[warp + lane];
      if (f.state != State::shuffle) continue;
      const Shuffle& s = f.shuffle;
      const auto where = [&] { return "thread " + std::to_string(warp + lane) + " at " + site(s); };
      if (!(s.mask >> lane & 1u)) fail("shuffle mask " + hex(s.mask) + " omits the calling lane: " + where());
      if (s.mask & ~existing) fail("shuffle mask " + hex(s.mask) + " names lanes the block lacks: " + where());
      bool complete = true;
      for (int k = 0; k < lanes && complete; ++k) {
        if (!(s.mask >> k & 1u)) continue;
        const Fiber& g = rt.fibers[warp + k];
        if (g.state == State::done) {
          fail("shuffle mask " + hex(s.mask) + " names lane " + std::to_string(k) + ", which has exited: " + where());
        }
        if (g.state != State::shuffle) complete = false;
        else if (!same_call(g.shuffle, s)) complete = false;  // diagnosed when nothing can progress
      }
      if (!complete) continue;
      for (int k = 0; k < lanes; ++k) {
        if (!(s.mask >> k & 1u)) continue;
        Fiber& g = rt.fibers[warp + k];
        const unsigned src = source_lane(g.shuffle, static_cast<unsigned>(k));
        if (!(s.mask >> src & 1u)) {
          fail("lane " + std::to_string(k) + " reads lane " + std::to_string(src) + ", outside shuffle mask " +
               hex(s.mask) + ": " + where());
        }
        g.shuffle.out = rt.fibers[warp + src].shuffle.in;
      }
      for (int k = 0; k < lanes; ++k) {
        if (s.mask >> k & 1u) {
          rt.fibers[warp + k].state = State::ready;
          ++released;
        }
      }
    }
  }
  return released;
}

// Nothing can progress: names the first lane whose shuffle partners wait elsewhere.
[[noreturn]] inline void report_divergence(int threads) {
  for (int t = 0; t < threads; ++t) {
    const Fiber& f = rt.fibers[t];
    if (f.state != State::shuffle) continue;
    const int warp = t / 32 * 32;
    for (int k = 0; k < 32 && warp + k < threads; ++k) {
      const Fiber& g = rt.fibers[warp + k];
      if (!(f.shuffle.mask >> k & 1u)) continue;
      if (g.state == State::done) {
        fail("shuffle mask " + hex(f.shuffle.mask) + " names lane " + std::to_string(k) + ", which has exited: thread " +
             std::to_string(t) + " at " + site(f.shuffle));
      }
      if (!same_call(g.shuffle, f.shuffle)) {
        fail("divergent shuffle: thread " + std::to_string(t) + " waits at " + site(f.shuffle) + " (mask " +
             hex(f.shuffle.mask) + ", width " + std::to_string(f.shuffle.width) + "), thread " +
             std::to_string(warp + k) + " at " + site(g.shuffle) + " (mask " + hex(g.shuffle.mask) + ", width " +
             std::to_string(g.shuffle.width) + ")");
      }
    }
  }
  fail("deadlock: threads wait at shuffles that can never complete");
}

// A failure inside a fiber (whose stack cannot unwind into the scheduler): ends the launch.
[[noreturn]] inline void abort_launch(const std::string& message) {
  if (rt.error.empty()) rt.error = message;
  exit_fiber();
}

template <typename T>
T shuffle(int mode, unsigned mask, T value, unsigned operand, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1))) {
    abort_launch("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32] (" + file + ":" +
                 std::to_string(line) + ")");
  }
  Fiber& f = rt.fibers[rt.current];
  f.shuffle = {file, line, mode, width, mask, operand, 0, 0};
  std::memcpy(&f.shuffle.in, &value, sizeof(T));
  f.state = State::shuffle;
  yield();
  T out;
  std::memcpy(&out, &rt.fibers[rt.current].shuffle.out, sizeof(T));
  return out;
}

// Device-side assertion: aborts the whole launch.
inline void kernel_assert(bool ok, const char* message, const char* file, int line) {
  if (!ok) abort_launch(std::string(message) + " (device-side assertion at " + file + ":" + std::to_string(line) + ")");
}

// A vector access of `bytes` at p: aborts the launch unless p is a multiple of `bytes`.
inline void check_aligned(const void* p, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    abort_launch("misaligned address: " + std::to_string(bytes) + "-byte access at " +
                 std::to_string(reinterpret_cast<uintptr_t>(p) % bytes) + " bytes past alignment (" + file + ":" +
                 std::to_string(line) + ")");
  }
}

// Runs body once per thread of a grid x block launch; throws Error on a violation.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) fail("block of " + std::to_string(threads) + " threads");
#ifdef CUDA_EMU_ASAN
  constexpr size_t stack_bytes = 256 << 10;
#else
  constexpr size_t stack_bytes = 64 << 10;
#endif
  rt.grid_dim = grid;
  rt.block_dim = block;
  rt.body = &body;
  rt.error.clear();
  if (rt.fibers.size() != static_cast<size_t>(threads)) {
    rt.fibers = std::vector<Fiber>(threads);
    for (Fiber& f : rt.fibers) f.stack.assign(stack_bytes, 0);
  }
  try {
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned i = 0; i < grid.x; ++i) {
          rt.block_idx = {rt.reverse ? grid.x - 1 - i : i, by, bz};
          for (Fiber& f : rt.fibers) f.state = State::ready;
          for (int done = 0; done < threads;) {
            for (int i_t = 0; i_t < threads; ++i_t) {
              const int t = rt.reverse ? threads - 1 - i_t : i_t;
              if (rt.fibers[t].state == State::ready) run_fiber(t);
              if (!rt.error.empty()) fail(rt.error);
            }
            done = 0;
            for (const Fiber& f : rt.fibers) done += f.state == State::done;
            if (done < threads && resolve_shuffles(threads) == 0) report_divergence(threads);
          }
        }
      }
    }
  } catch (const Error&) {
    for (Fiber& f : rt.fibers) f.started = false;  // their stacks hold a kernel that will not finish
    throw;
  }
}

}  // namespace cuda_emu

// The CUDA built-ins the kernels use.
#define threadIdx (cuda_emu::rt.thread_idx)
#define blockIdx (cuda_emu::rt.block_idx)
#define blockDim (cuda_emu::rt.block_dim)
#define gridDim (cuda_emu::rt.grid_dim)

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return cuda_emu::shuffle(0, mask, var, static_cast<unsigned>(lane_mask), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return cuda_emu::shuffle(1, mask, var, delta, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return cuda_emu::shuffle(2, mask, var, delta, width, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return cuda_emu::shuffle(3, mask, var, static_cast<unsigned>(src_lane), width, file, line);
}

template <typename T, typename U>
inline T atomicAdd(T* address, U value) {
  const T old = *address;
  *address = old + static_cast<T>(value);
  return old;
}

#define MSDA_KERNEL_ASSERT(cond, msg) cuda_emu::kernel_assert(static_cast<bool>(cond), msg, __FILE__, __LINE__)
#define MSDA_CHECK_ALIGNED(pointer, bytes) cuda_emu::check_aligned(pointer, bytes, __FILE__, __LINE__)
