// The CUDA architectures this build of dino_detr._C contains, for the kernel-image check of
// dino_detr/layers/cuda_arch.py: torch.ops.dino_detr.cuda_arch_list() -> "sm_80,sm_90,compute_90".
// setup.py passes them as DINO_DETR_CUDA_CODES=sm_80.sm_90.compute_90 (the nvcc code names of
// its -gencode flags; nvcc would split a -D value at commas); a build without it returns "" and
// the check is skipped.
#include <algorithm>
#include <string>

#include <torch/library.h>

#define DINO_DETR_STRINGIFY(...) #__VA_ARGS__
#define DINO_DETR_EXPAND_STRINGIFY(...) DINO_DETR_STRINGIFY(__VA_ARGS__)

namespace dino_detr {
namespace {

std::string cuda_arch_list() {
#ifdef DINO_DETR_CUDA_CODES
  std::string codes = DINO_DETR_EXPAND_STRINGIFY(DINO_DETR_CUDA_CODES);
  std::replace(codes.begin(), codes.end(), '.', ',');
  return codes;
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_detr, m) {
  m.def("cuda_arch_list() -> str", &cuda_arch_list);
}

}  // namespace dino_detr
