// The Python module pfedmoap._C: thin pybind11 bindings over the ops in pfedmoap.h.
#include <torch/extension.h>

#include "pfedmoap.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pfedmoap's compiled ops: batched expert prompt assembly and KNN over the prompt pool (CPU, CUDA)";
  m.def("assemble_prompts", &pfedmoap::assemble_prompts,
        "prefix [C, P0, W], suffix [C, S, W], ctx [E, n_ctx, W] (one dtype and device) -> [E * C, P0 + n_ctx + S, W]",
        py::arg("prefix"), py::arg("suffix"), py::arg("ctx"));
  m.def("assemble_prompts_backward", &pfedmoap::assemble_prompts_backward,
        "grad [E * C, L, W] -> grad_ctx [E, n_ctx, W]: the sum over classes at the context positions",
        py::arg("grad"), py::arg("experts"), py::arg("classes"), py::arg("prefix_len"), py::arg("n_ctx"));
  m.def("knn", &pfedmoap::knn,
        "pool [N, ...], present [N] bool, queries [Q] long, k -> [Q, take] long: nearest other present rows first, "
        "ties to the lower id",
        py::arg("pool"), py::arg("present"), py::arg("queries"), py::arg("k"), py::arg("chunk_rows") = 0,
        py::arg("method") = "auto");
  m.def("cuda_built", &pfedmoap::cuda_built, "whether this build has the CUDA kernels");
  // the CUDA kernels' per-thread logic run on the host over a given launch shape (tests/test_cuda_logic.py)
  m.def("_host_assemble_prompts", &pfedmoap::assemble_prompts_host, py::arg("prefix"), py::arg("suffix"),
        py::arg("ctx"), py::arg("grid"), py::arg("block"), py::arg("unit_bytes"));
  m.def("_host_assemble_prompts_backward", &pfedmoap::assemble_prompts_backward_host, py::arg("grad"),
        py::arg("experts"), py::arg("classes"), py::arg("prefix_len"), py::arg("n_ctx"), py::arg("grid"),
        py::arg("block"));
  m.def("_host_row_sq_norms", &pfedmoap::row_sq_norms_host, py::arg("rows"), py::arg("grid"), py::arg("block"));
  m.def("_host_knn_merge_block", &pfedmoap::knn_merge_block_host, py::arg("keys"), py::arg("col0"), py::arg("best_d"),
        py::arg("best_i"), py::arg("take"), py::arg("block"));
  m.attr("kernel_threads") = pfedmoap::kKernelThreads;
}
