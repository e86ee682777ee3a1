// `import moequant._C` loads this shared library, whose static initializers register the ops.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "moequant's compiled operators (torch.ops.moequant)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
