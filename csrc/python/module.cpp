// An empty Python module, so that setup.py's build of the kernels, pmi_kernels._C, is also an importable
// module (setuptools exports PyInit__C). Importing it, or torch.ops.load_library on it, registers the
// ops through TORCH_LIBRARY in ops.cpp; nothing here binds Python, so one abi3 library serves every
// CPython from 3.10 on (Py_LIMITED_API, defined by torch's BuildExtension). The just-in-time build
// (pmi_kernels/backends/native/extension.py) leaves this file out.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // documentation
      -1,    // size of per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
