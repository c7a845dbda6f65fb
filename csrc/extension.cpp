// The importable module sparsekernels._C. It holds no functions itself: every kernel
// registers into the `sparsekernels_C` op namespace (TORCH_LIBRARY_FRAGMENT in its own
// source file), and importing this module runs those registrations.
#include <Python.h>

static struct PyModuleDef sparsekernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                   nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsekernels_module); }
