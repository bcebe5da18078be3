// Operator schemas of multi-scale deformable attention and the Python module `dino_detr._C`.
// Kernels: cpu/ms_deform_attn_cpu.cpp (CPU), cuda/ms_deform_attn_cuda.cu (CUDA, when WITH_CUDA).
// Autograd and fake kernels are registered in Python (dino_detr/layers/ms_deform_attn.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dino_detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor grad_value, Tensor grad_sampling_locations, Tensor grad_attention_weights)");
}

// Importing the module loads this library, which registers the operators above.
static struct PyModuleDef dino_detr_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dino_detr_c_module);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddObject(module, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(module, "WITH_CUDA", Py_NewRef(Py_False));
#endif
  return module;
}
