"""ctypes front of the host-emulated MSDA CUDA kernels (``msda_emu.cpp`` built by ``build.sh``).

``EmulatedCuda(path, kernel=...)`` runs the kernels and launch code of
``dino_detr/csrc/cuda/ms_deform_attn_launch.cuh`` on CPU tensors: ``forward`` and ``backward``
as the CUDA operators call them, and ``op``, a differentiable function with the signature of
``dino_detr.layers.ms_deform_attn`` (what the CUDA tests call). ``kernel`` names a variant:
each stage runs it when it has one of that name, else its baseline (as ``DINO_DETR_MSDA_KERNEL``).
"""

import ctypes
import os

import torch

__all__ = ["EmulatedCuda", "default_library", "load_emulation", "DTYPE_CODES", "KERNELS"]

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_library(kind="base"):
    """Path of the emulation library (``$DINO_DETR_CUDA_EMU`` or ``build/cuda_emu/<kind>/libmsda_emu.so``)."""
    return os.environ.get("DINO_DETR_CUDA_EMU") or os.path.join(_ROOT, "build", "cuda_emu", kind, "libmsda_emu.so")


def _sizes(value, loc, shapes):
    n, s, m, d = value.shape
    return torch.tensor([n, s, m, d, loc.shape[1], shapes.shape[0], loc.shape[4]], dtype=torch.int64)


# Variants of the launch code, every stage's name (forward and backward variants; see
# ms_deform_attn_launch.cuh): what the emulated tests run, each in turn.
KERNELS = ("baseline", "vectorized", "deterministic")


def _kernel_names(lib, stage):
    names, i = [], 0
    while (name := lib.msda_emu_kernel_name(stage, i)) is not None:
        names.append(name.decode())
        i += 1
    return names


class EmulatedCuda:
    """The CUDA kernels on the CPU. ``max_blocks`` > 0 caps the grid (grid-stride tails);
    ``kernel``: the variant; ``reverse``: blocks and threads run in reverse order (another order
    of the atomics); ``misalign``: every tensor starts that many elements past a 16-byte boundary."""

    def __init__(self, path, max_blocks=0, kernel="baseline", reverse=False, misalign=0):
        self.lib = ctypes.CDLL(os.path.abspath(path))
        self.max_blocks = max_blocks
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.msda_emu_forward.argtypes = [i32, i32, i32] + [p] * 7 + [i64, ctypes.c_char_p, i32]
        self.lib.msda_emu_backward.argtypes = [i32, i32, i32] + [p] * 10 + [i64, ctypes.c_char_p, i32]
        self.lib.msda_emu_grad_value_dtype.argtypes = [i32]
        self.lib.msda_emu_kernel_name.argtypes = [i32, i32]
        self.lib.msda_emu_kernel_name.restype = ctypes.c_char_p
        self.lib.cuda_emu_set_reverse.argtypes = [i32]
        self.lib.msda_emu_set_misalign.argtypes = [i32]
        self.lib.cuda_emu_schedule_order.argtypes = [p, ctypes.c_char_p, i32]
        self.kernel_names = (_kernel_names(self.lib, 0), _kernel_names(self.lib, 1))
        if not any(kernel in names for names in self.kernel_names):
            raise ValueError(f"unknown kernel {kernel!r}; variants: {self.kernel_names}")
        # (forward, backward) kernel indices: the named variant where a stage has it, else its baseline.
        self.kernels = tuple(names.index(kernel) if kernel in names else 0 for names in self.kernel_names)
        self.reverse, self.misalign = reverse, misalign
        self.op = self._make_op()

    def schedule_order(self):
        """The emulator's schedule self-test (msda_emu.cpp): global thread numbers in the order they ran."""
        out = (ctypes.c_int * 8)()
        err = ctypes.create_string_buffer(2048)
        self.lib.cuda_emu_set_reverse(int(self.reverse))
        if self.lib.cuda_emu_schedule_order(out, err, len(err)):
            raise RuntimeError(err.value.decode())
        return list(out)

    def selftest(self, kind):
        """Runs the emulator's warp-rule self-test ``kind`` (see msda_emu.cpp): the warp sum, or raises."""
        out = ctypes.c_int(-1)
        err = ctypes.create_string_buffer(2048)
        if self.lib.cuda_emu_selftest(kind, ctypes.byref(out), err, len(err)):
            raise RuntimeError(err.value.decode())
        return out.value

    def _grad_value_dtype(self, dtype):
        """dtype of the buffer the backward accumulates grad_value into (float32 for the half types)."""
        code = self.lib.msda_emu_grad_value_dtype(DTYPE_CODES[dtype])
        return next(t for t, c in DTYPE_CODES.items() if c == code)

    def _call(self, fn, stage, value, loc, *pointers):
        err = ctypes.create_string_buffer(2048)
        self.lib.cuda_emu_set_reverse(int(self.reverse))
        self.lib.msda_emu_set_misalign(self.misalign)
        kernel = self.kernels[stage]
        rc = fn(kernel, DTYPE_CODES[value.dtype], DTYPE_CODES[loc.dtype], *pointers, self.max_blocks, err, len(err))
        if rc:
            raise RuntimeError(f"emulated CUDA kernel: {err.value.decode()}")

    def forward(self, value, shapes, starts, loc, attn, prefill=float("nan")):
        """(N, Lq, M * D); the output buffer starts filled with ``prefill`` (the .cu allocates it uninitialized)."""
        value, shapes, starts, loc, attn = (t.contiguous() for t in (value, shapes, starts, loc, attn))
        n, _, m, d = value.shape
        out = torch.full((n, loc.shape[1], m * d), prefill, dtype=value.dtype)
        sizes = _sizes(value, loc, shapes)
        self._call(
            self.lib.msda_emu_forward,
            0,
            value,
            loc,
            value.data_ptr(),
            shapes.data_ptr(),
            starts.data_ptr(),
            loc.data_ptr(),
            attn.data_ptr(),
            out.data_ptr(),
            sizes.data_ptr(),
        )
        return out

    def backward(self, grad_out, value, shapes, starts, loc, attn):
        """(grad_value, grad_sampling_locations, grad_attention_weights), as the CUDA operator returns them."""
        grad_out, value, shapes, starts, loc, attn = (
            t.contiguous() for t in (grad_out, value, shapes, starts, loc, attn)
        )
        gv = torch.zeros(value.shape, dtype=self._grad_value_dtype(value.dtype))
        gl, ga = torch.zeros_like(loc), torch.zeros_like(attn)
        sizes = _sizes(value, loc, shapes)
        self._call(
            self.lib.msda_emu_backward,
            1,
            value,
            loc,
            grad_out.data_ptr(),
            value.data_ptr(),
            shapes.data_ptr(),
            starts.data_ptr(),
            loc.data_ptr(),
            attn.data_ptr(),
            gv.data_ptr(),
            gl.data_ptr(),
            ga.data_ptr(),
            sizes.data_ptr(),
        )
        return gv.to(value.dtype), gl, ga

    def _make_op(self):
        emu = self

        class Op(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value, shapes, starts, loc, attn):
                ctx.save_for_backward(value, shapes, starts, loc, attn)
                return emu.forward(value, shapes, starts, loc, attn)

            @staticmethod
            def backward(ctx, grad_out):
                grad_value, grad_loc, grad_attn = emu.backward(grad_out, *ctx.saved_tensors)
                return grad_value, None, None, grad_loc, grad_attn

        return Op.apply


def load_emulation(max_blocks=0, kernel="baseline", reverse=False, misalign=0):
    path = default_library()
    if not os.path.exists(path):
        message = f"the CUDA emulation library {path} is not built (make cuda-emulation)"
        if os.environ.get("DINO_DETR_REQUIRE_CUDA_EMU") == "1":
            raise FileNotFoundError(message)
        import pytest

        pytest.skip(message)
    return EmulatedCuda(path, max_blocks, kernel, reverse, misalign)
