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
  m.def("int8_linear_inference", &sparsekernels::cpu::int8_linear_inference,
        "bsr_linear_int8 on the CPU for an eager call that needs no gradient "
        "(QuantizedSparseLinear) on its packed blocks; None when x is not [..., in_features] "
        "float32 or bfloat16 on the CPU",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("comp"), pybind11::arg("scale"),
        pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("bias"),
        pybind11::arg("scheme"), pybind11::arg("in_features"), pybind11::arg("w8_max_rows"));
}
