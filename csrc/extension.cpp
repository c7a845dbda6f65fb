// The importable module sparsekernels._C. The kernels register into the `sparsekernels_C`
// op namespace (TORCH_LIBRARY_FRAGMENT in their own source files), and importing this
// module runs those registrations. The module's own functions are the direct entries that
// skip the op dispatcher where its per-call cost matters (decode): see cpu/direct.h.
#include <torch/extension.h>

#include "cpu/direct.h"

PYBIND11_MODULE(_C, m) {
  m.def("linear_inference", &sparsekernels::cpu::linear_inference,
        "bsr_linear on the CPU for an eager call that needs no gradient (SparseLinear); None "
        "when x is not [..., in_features] in the values' dtype on the CPU",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("crow_indices"),
        pybind11::arg("col_indices"), pybind11::arg("bias"), pybind11::arg("in_features"));
}
